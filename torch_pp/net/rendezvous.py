"""The rendezvous: meeting the other ranks through torchrun's store, before and beside Gloo.

Every rank posts a "hello" (host, OS, versions, the address Gloo will advertise) in the
store, so that set-ups Gloo cannot join (Linux with macOS, a loopback address across
machines) fail with a message instead of a hang. The store then carries the start-up
collective (JSON, never pickle), published values (a notebook driver's options) and the
liveness monitor's heartbeats, on a connection of its own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import random
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import TransportError
from .machine import machine_id, same_machine, store_route


def local_info(*, store_addr: str | None = None, store_port: int = 0) -> dict:
    """This process's facts for the start-up hello and ``doctor``.

    Args:
        store_addr: The rendezvous store's address (None for a single process): the local address
            that reaches it (``route``) tells machines apart and is what Gloo advertises by default.
        store_port: The store's port.
    """
    import transformers

    from .._version import __version__

    iface = os.environ.get("GLOO_SOCKET_IFNAME") or None
    route = store_route(store_addr, store_port) if store_addr else None
    return {
        "host": socket.gethostname(),
        "machine": machine_id(),
        "route": route,
        "pid": os.getpid(),
        "os": platform.system(),
        "os_release": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_pp": __version__,
        "iface": iface,
        "address": advertised_address(iface, route=route),
    }


def advertised_address(iface: str | None, *, route: str | None = None) -> str | None:
    """The IPv4 address Gloo will advertise: the named interface's (None if it has none); else the
    address this rank reaches the store from, unless that is loopback; else the hostname's."""
    if iface:
        import psutil

        for addr in psutil.net_if_addrs().get(iface, []):
            if addr.family == socket.AF_INET:
                return addr.address
        return None
    if route and (ip := ipaddress.ip_address(route)).version == 4 and not ip.is_loopback:
        return route  # the other ranks reach the store's machine, and it reaches us back, on this link
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def check_hellos(hellos: dict[int, dict]) -> None:
    """Refuse set-ups that Gloo cannot join, with a message instead of a hang.

    Raises:
        TransportError: for a Linux/macOS mixture, a missing interface, or a loopback address across machines.
    """
    systems: dict[str, list[int]] = {}
    for r, h in hellos.items():
        systems.setdefault(h["os"], []).append(r)
    if len(systems) > 1:
        listing = "; ".join(f"{name}: ranks {', '.join(map(str, rs))}" for name, rs in systems.items())
        raise TransportError(f"Gloo cannot join ranks on different operating systems ({listing}); run every stage on the same OS")
    for r, h in hellos.items():
        if h["iface"] and h["address"] is None:
            raise TransportError(f"rank {r} on {h['host']}: GLOO_SOCKET_IFNAME={h['iface']} has no IPv4 address; check the interface name")
    if not on_one_machine(hellos):
        for r, h in hellos.items():
            if h["address"] is None or ipaddress.ip_address(h["address"]).is_loopback:
                raise TransportError(
                    f"rank {r} on {h['host']} would advertise {h['address']} (loopback) to the other machines; "
                    "set GLOO_SOCKET_IFNAME to the interface that reaches them (launch/node.sh --iface)"
                )


def on_one_machine(hellos: dict[int, dict]) -> bool:
    """Whether every rank runs on one machine (see ``machine.machine_key``)."""
    first = next(iter(hellos.values()))
    return all(same_machine(first, h) for h in hellos.values())


def gloo_address(hellos: dict[int, dict], rank: int) -> str:
    """The IPv4 address this rank's Gloo device binds to and advertises.

    Gloo left to itself takes the first address of GLOO_SOCKET_IFNAME of any family (macOS
    lists the IPv6 link-local one first, which the other Mac may not reach) or resolves the
    hostname (mDNS on a Mac). So it is told: the named interface's IPv4 address whenever
    GLOO_SOCKET_IFNAME names one (never overridden: the user knows the link); else 127.0.0.1
    when every rank is on this machine; else the address the hello reported (the one this rank
    reaches the store from). ``doctor`` shows the address and what told the machines apart.
    """
    me = hellos[rank]
    if me["iface"]:
        return me["address"]
    return "127.0.0.1" if on_one_machine(hellos) else me["address"]


def join_failure(store, hellos: dict[int, dict], *, rank: int, address: str, seconds: float, exc: Exception) -> str:
    """Name the ranks this one could not connect to (those that did not form the group either)."""
    time.sleep(1.0)  # ranks that did connect mark it right away
    missing = []
    for r, h in hellos.items():
        try:
            joined = r == rank or store.check([f"joined/{r}"])
        except Exception:  # noqa: BLE001 - the store's host may have given up already
            joined = False
        if not joined:
            missing.append(f"rank {r} on {h['host']} ({gloo_address(hellos, r)})")
    who = ", ".join(missing) or "the other ranks"
    return (f"rank {rank} on {hellos[rank]['host']} ({address}) could not connect to {who} within {seconds:.0f} s "
            f"(TORCH_PP_JOIN_TIMEOUT): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check that each "
            "machine can reach the others' addresses on the fast link (ping), the firewall (allow Python to accept "
            "incoming connections), and GLOO_SOCKET_IFNAME (launch/node.sh --iface)")


def free_port() -> int:
    """A TCP port free on this machine now (for a store this process hosts, or a test's).

    Taken below the kernel's ephemeral range, never from it (as ``bind(0)`` would): workers started
    before the store listens retry their connects to it, and a connect's own source port comes from
    that range; once one happened to be the store's port, it connected to itself (TCP's
    simultaneous open) and the store's bind failed with EADDRINUSE.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    pick = random.SystemRandom()
    for _ in range(100):
        port = pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface: the store listens on all of them
            except OSError:
                continue
            return port
    raise TransportError(f"no free TCP port found between {low} and {high}")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's reading; 32768, below macOS's 49152, elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class Rendezvous:
    """This rank's connection to the store on rank 0's machine, and what the ranks posted there.

    Attributes:
        rank: This rank.
        world_size: Number of ranks.
        hellos: rank -> facts each rank posted (see ``local_info``).
        timeout_s: How long to wait for the other ranks at start-up.
    """

    def __init__(self, *, rank: int, world_size: int, addr: str, port: int, host_store: bool, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self._addr, self._port = addr, port
        self.hosting = host_store
        self._gathers = 0
        try:
            self.base = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                                      wait_for_workers=False) if host_store else self.client()
            self.store = dist.PrefixStore("torch_pp/", self.base)
            self.store.set(f"hello/{rank}", json.dumps(local_info(store_addr=addr, store_port=port)))
            keys = [f"hello/{r}" for r in range(world_size)]
            self.store.wait(keys, timedelta(seconds=timeout_s))
            self.hellos = {r: json.loads(self.store.get(k)) for r, k in enumerate(keys)}
        except Exception as exc:  # noqa: BLE001
            raise TransportError(
                f"rank {rank} could not meet the other ranks at {addr}:{port}: {exc}. "
                "Check the master address and port, the firewall, and that every machine was started"
            ) from exc

    def client(self):
        """A new connection to the store (the liveness monitor keeps one of its own)."""
        return dist.TCPStore(self._addr, self._port, None, is_master=False, timeout=timedelta(seconds=self.timeout_s))

    def group_store(self):
        """The store Gloo forms its group through."""
        return dist.PrefixStore("torch_pp_pg/", self.base)

    def monitor_store(self):
        """A store on its own connection, for the liveness monitor."""
        return dist.PrefixStore("torch_pp/", self.client())

    def publish(self, key: str, value: str) -> None:
        """Post a value for the other ranks (e.g. the driver's start options)."""
        self.store.set(f"pub/{key}", value)

    def fetch(self, key: str, *, timeout_s: float | None = None) -> str:
        """Wait for a value another rank published."""
        self.store.wait([f"pub/{key}"], timedelta(seconds=timeout_s or self.timeout_s))
        return self.store.get(f"pub/{key}").decode()

    def all_gather(self, obj: object) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order.

        Raises:
            TransportError: if some rank does not post within the start-up timeout, naming it.
        """
        self._gathers += 1
        keys = [f"gather/{self._gathers}/{r}" for r in range(self.world_size)]
        self.store.set(keys[self.rank], json.dumps(obj))
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001
            missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
            who = ", ".join(f"rank {r} ({self.hellos[r]['host']})" for r in missing) or "a rank"
            raise TransportError(f"rank {self.rank} waited {self.timeout_s:.0f} s at start-up for {who}: {exc}") from exc
        return [json.loads(self.store.get(k)) for k in keys]

    def mark_joined(self) -> None:
        self.store.set(f"joined/{self.rank}", "1")

    def linger(self, *, seconds: float) -> None:
        """On the store's host, keep it up until every other rank has left (or ``seconds`` pass)."""
        if not self.hosting:
            return
        others = [f"done/{r}" for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.store.check(others):
            time.sleep(0.05)
