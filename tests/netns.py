"""Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Each host is a namespace with its own ``eth0`` address on 10.77.<subnet>.0/24 and (through
``unshare --uts``) its own hostname, or, with ``own_hostnames=False``, the machine's hostname
and machine id, as clones of one image have. The bridge lives in a hub namespace, so the
machine's own network is untouched. ``close()`` kills every process in the namespaces and
deletes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns); run the suite as root"
    probe = f"tppprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns add failed here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Cluster:
    """``n`` hosts on one bridge; ``host i`` has address ``addr(i)`` and hostname ``host<i>``
    (the machine's own with ``own_hostnames=False``)."""

    def __init__(self, n: int, *, subnet: int, own_hostnames: bool = True) -> None:
        self.n, self.subnet, self.own_hostnames = n, subnet, own_hostnames
        self.tag = f"t{os.getpid() % 10000}s{subnet}"
        self.hub = f"{self.tag}hub"
        self.names = [f"{self.tag}n{i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                a, b = f"{self.tag}{i}a", f"{self.tag}{i}b"
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", ns)
                _ip("link", "set", b, "netns", self.hub)
                _ip("-n", ns, "link", "set", a, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.hub, "link", "set", b, "master", "br0")
                _ip("-n", self.hub, "link", "set", b, "up")
        except Exception:
            self.close()
            raise

    def addr(self, i: int) -> str:
        return f"10.77.{self.subnet}.{i + 1}"

    def cap(self, i: int, *, rate: str = "1gbit") -> None:
        """Cap host i's outgoing bandwidth with tc tbf."""
        _ip("-n", self.names[i], "link", "show")  # the namespace exists
        subprocess.run(["ip", "netns", "exec", self.names[i], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                        "rate", rate, "burst", "1mb", "latency", "100ms"], check=True, capture_output=True)

    def add_ipv6(self, i: int) -> str:
        """Give host i's eth0 a global IPv6 address too (Gloo must still use the IPv4 one)."""
        addr = f"fd77:{self.subnet}::{i + 1}"
        _ip("-n", self.names[i], "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
        return addr

    def add_unreachable_link(self, i: int) -> str:
        """Give host i a second interface, eth1, whose subnet the other hosts route to a neighbour that
        does not exist: packets to it vanish, as behind a firewall that drops them. Returns its address."""
        a, b = f"{self.tag}{i}x", f"{self.tag}{i}y"
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", a, "netns", self.names[i])
        _ip("link", "set", b, "netns", self.hub)  # left out of the bridge
        _ip("-n", self.names[i], "link", "set", a, "name", "eth1")
        addr = f"10.66.{self.subnet}.{i + 1}"
        _ip("-n", self.names[i], "addr", "add", f"{addr}/24", "dev", "eth1")
        _ip("-n", self.names[i], "link", "set", "eth1", "up")
        for j, ns in enumerate(self.names):
            if j != i:
                _ip("-n", ns, "route", "add", f"10.66.{self.subnet}.0/24", "via", f"10.77.{self.subnet}.250")
        return addr

    def node(self, i: int, args: list[str], *, env: dict | None = None, port: int = 29600, iface: str | None = "eth0") -> subprocess.Popen:
        """Start ``launch/node.sh`` on host i with ``-- args``; with ``iface=None``, plain torchrun
        with no GLOO_SOCKET_IFNAME (as a user who skips the launcher starts it)."""
        if iface is None:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.n), "--node-rank", str(i),
                      "--nproc-per-node", "1", "--master-addr", self.addr(0), "--master-port", str(port), "-m", "torch_pp", *args]
        else:
            launch = [
                "bash", str(ROOT / "launch" / "node.sh"), "--nnodes", str(self.n), "--node-rank", str(i),
                "--master-addr", self.addr(0), "--master-port", str(port), "--iface", iface, "--threads", "1", "--", *args,
            ]
        cmd = ["ip", "netns", "exec", self.names[i]]
        if self.own_hostnames:
            cmd += ["unshare", "--uts", "sh", "-c", f'hostname host{i} && exec "$@"', "sh"]
        full_env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
        full_env.update({"TORCH_PP_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
        cmd += launch
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        for ns in [*self.names, self.hub]:
            for pid in self.pids_of(ns):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in [*self.names, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @staticmethod
    def pids_of(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
