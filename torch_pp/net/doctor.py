"""``torch_pp doctor``: check a cluster before a long run, with figures measured over the real Gloo path.

Every rank reports its machine (host, OS, versions, device, dtypes, memory); then
each link of the ring (rank r -> r+1) is measured in turn while the other ranks
wait: one-way latency of a hidden-state-sized message (half the median round
trip) and bandwidth of a 16 MiB message (time until the receiver's short
acknowledgement, less one small-message latency). Rank 0 prints one table and
the warnings, and the exit status says whether a run would break.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..devices import memory_available, pick_device, supported_dtypes
from ..tables import table
from .link import Link
from .machine import machine_key, machine_label
from .transport import Transport
from .wire import Message, Op

BANDWIDTH_BYTES = 16 * 2**20


def _ping(t: Link, peer: int, payload: torch.Tensor, *, reps: int) -> list[float]:
    rtts = []
    for _ in range(reps):
        start = time.perf_counter()
        t.send(Message(Op.PING, {"echo": True}, [payload]), dst=peer)
        t.recv(src=peer)
        rtts.append(time.perf_counter() - start)
    return rtts


def _serve_pings(t: Link, peer: int, count: int) -> None:
    for _ in range(count):
        msg = t.recv(src=peer)
        t.send(Message(Op.PING, {}, msg.tensors if msg.meta.get("echo") else []), dst=peer)


def measure_links(t: Link, *, message_bytes: int, reps: int = 20, bw_reps: int = 3) -> list[dict]:
    """Measure every ring link in turn; every rank must call this. Returns the figures on each rank."""
    small = torch.zeros(message_bytes, dtype=torch.uint8)
    big = torch.zeros(BANDWIDTH_BYTES, dtype=torch.uint8)
    results = []
    for a in range(t.world_size if t.world_size > 1 else 0):
        b = (a + 1) % t.world_size
        if t.rank == a:
            _ping(t, b, small, reps=3)  # warm-up
            rtt = statistics.median(_ping(t, b, small, reps=reps))
            bw_times = []
            for _ in range(bw_reps):
                start = time.perf_counter()
                t.send(Message(Op.PING, {}, [big]), dst=b)
                t.recv(src=b)
                bw_times.append(time.perf_counter() - start)
            transfer = max(min(bw_times) - rtt / 2, 1e-9)
            results.append({"from": a, "to": b, "latency_ms": 1000 * rtt / 2, "gbit_per_s": BANDWIDTH_BYTES * 8 / transfer / 1e9})
        elif t.rank == b:
            _serve_pings(t, a, 3 + reps + bw_reps)
    return results


def run(t: Transport, *, device: str | None, message_bytes: int, expect_gbit: float | None,
        quantize_check: Callable[[torch.device], dict] | None = None) -> tuple[dict, list[str], list[str]]:
    """Collect facts and figures; on rank 0 return (report, warnings, problems).

    Args:
        quantize_check: Given this rank's device, tries a quantized multiply there and returns
            ``{"mode", "dtype", "refused": reason or None}`` (the caller owns the model math).
    """
    dev = pick_device(device, local_rank=t.local_rank)
    me = {**t.hellos[t.rank], "rank": t.rank, "device": str(dev), "dtypes": supported_dtypes(dev),
          "memory_available_bytes": memory_available(dev), "gloo_address": t.gloo_address}
    if quantize_check is not None:
        me["quantize"] = quantize_check(dev)
    if me["os"] == "Darwin":
        me["mac"] = mac_facts()
    links = measure_links(t, message_bytes=message_bytes)
    rows = t.all_gather({"node": me, "links": links})
    nodes = [r["node"] for r in rows]
    links = [link for r in rows for link in r["links"]]
    warnings, problems = [], []
    for key in ("torch_pp", "torch", "transformers", "python"):
        values = {n[key] for n in nodes}
        if len(values) > 1:
            text = f"{key} versions differ: " + ", ".join(f"rank {n['rank']} {n[key]}" for n in nodes)
            (problems if key == "torch_pp" else warnings).append(text)
    for n in nodes:
        if "mac" in n:
            mac_warnings, mac_problems = mac_checks(n)
            warnings += mac_warnings
            problems += mac_problems
    for n in nodes:
        q = n.get("quantize")
        if q and q["refused"]:
            problems.append(f"rank {n['rank']} on {n['host']}: {q['refused']}")
    several = len({machine_key(n) for n in nodes}) > 1
    for n in nodes:
        n["machine_seen_as"] = machine_label(n)
        if several and n["gloo_address"] and n["gloo_address"].startswith("127."):
            problems.append(f"rank {n['rank']} on {n['host']} advertises loopback {n['gloo_address']}: set GLOO_SOCKET_IFNAME")
    if links:
        median_bw = statistics.median(link["gbit_per_s"] for link in links)
        for link in links:
            if link["gbit_per_s"] < 0.5 * median_bw:
                warnings.append(f"link {link['from']}->{link['to']} is much slower than the others ({link['gbit_per_s']:.2f} vs median {median_bw:.2f} Gbit/s)")
            if expect_gbit and link["gbit_per_s"] < 0.7 * expect_gbit:
                warnings.append(f"link {link['from']}->{link['to']} gives {link['gbit_per_s']:.2f} Gbit/s, expected about {expect_gbit:g}")
    return {"nodes": nodes, "links": links, "warnings": warnings, "problems": problems}, warnings, problems


def mac_facts() -> dict:
    """What doctor checks on a Mac: the macOS version, idle sleep, the firewall, ``caffeinate``."""
    import platform
    import shutil
    import subprocess

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    sleep = None
    for line in run("pmset", "-g").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "sleep" and parts[1].isdigit():
            sleep = int(parts[1])
    firewall = run("/usr/libexec/ApplicationFirewall/socketfilterfw", "--getglobalstate")
    return {"macos": platform.mac_ver()[0], "sleep_minutes": sleep, "caffeinate": shutil.which("caffeinate") is not None,
            "firewall_on": "enabled" in firewall.lower() if firewall else None}


def mac_checks(node: dict) -> tuple[list[str], list[str]]:
    """Warnings and problems for one Mac of the cluster (``node["mac"]`` from ``mac_facts``)."""
    mac, who = node["mac"], f"rank {node['rank']} on {node['host']}"
    warnings, problems = [], []
    major = int(mac["macos"].split(".")[0]) if mac.get("macos") else 0
    if major and major < 14:
        problems.append(f"{who} runs macOS {mac['macos']}: torch_pp needs macOS 14 or newer (torch 2.13; bf16 on MPS)")
    if tuple(int(x) for x in node["python"].split(".")[:2]) < (3, 10):
        problems.append(f"{who} runs Python {node['python']}: use Python 3.10 or newer (not Apple's /usr/bin/python3)")
    if mac.get("sleep_minutes") and not mac.get("caffeinate"):
        warnings.append(f"{who} idle-sleeps after {mac['sleep_minutes']} min and has no caffeinate: a sleeping Mac is "
                        "declared lost; set System Settings > Energy > Prevent automatic sleeping")
    if mac.get("firewall_on"):
        warnings.append(f"{who} has the macOS firewall on: allow Python to accept incoming connections (System "
                        "Settings > Network > Firewall > Options), or the other machines cannot connect")
    if not node.get("iface"):
        warnings.append(f"{who} has no GLOO_SOCKET_IFNAME: on several Macs give the link's interface "
                        "(launch/node.sh --iface bridge0 for Thunderbolt, enN for 10GbE)")
    return warnings, problems


def format_report(report: dict) -> str:
    """The human table for rank 0's stdout."""
    lines = []
    head = ["rank", "host", "machine", "os", "python", "torch", "transformers", "torch_pp", "device", "dtypes", "mem avail", "address"]
    rows = [[str(n["rank"]), n["host"], n["machine_seen_as"], n["os"], n["python"], n["torch"], n["transformers"], n["torch_pp"], n["device"],
             ",".join(d.replace("float", "f").replace("bf", "bf") for d in n["dtypes"]),
             f"{n['memory_available_bytes'] / 2**30:.1f} GiB", f"{n['gloo_address'] or n['address']} ({n['iface'] or 'default'})"] for n in report["nodes"]]
    lines += table(head, rows)
    if report["links"]:
        lines.append("")
        lines += table(["link", "one-way latency", "bandwidth"],
                        [[f"{l['from']} -> {l['to']}", f"{l['latency_ms']:.3f} ms", f"{l['gbit_per_s']:.2f} Gbit/s"] for l in report["links"]])
    checked = [n["quantize"] for n in report["nodes"] if n.get("quantize")]
    if checked:
        ok = [f"rank {n['rank']}" for n in report["nodes"] if n.get("quantize") and not n["quantize"]["refused"]]
        lines.append(f"--quantize {checked[0]['mode']}: runs on {', '.join(ok) or 'no rank'}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    for p in report["problems"]:
        lines.append(f"problem: {p}")
    lines.append("doctor: " + ("problems found: a run would fail" if report["problems"] else "ok"))
    return "\n".join(lines)
