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

import torch

from .devices import memory_available, pick_device, supported_dtypes
from .transport import Transport
from .wire import Message, Op

BANDWIDTH_BYTES = 16 * 2**20


def _ping(t: Transport, peer: int, payload: torch.Tensor, *, reps: int) -> list[float]:
    rtts = []
    for _ in range(reps):
        start = time.perf_counter()
        t.send(Message(Op.PING, {"echo": True}, [payload]), dst=peer)
        t.recv(src=peer)
        rtts.append(time.perf_counter() - start)
    return rtts


def _serve_pings(t: Transport, peer: int, count: int) -> None:
    for _ in range(count):
        msg = t.recv(src=peer)
        t.send(Message(Op.PING, {}, msg.tensors if msg.meta.get("echo") else []), dst=peer)


def measure_links(t: Transport, *, message_bytes: int, reps: int = 20, bw_reps: int = 3) -> list[dict]:
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


def run(t: Transport, *, device: str | None, message_bytes: int, expect_gbit: float | None) -> tuple[dict, list[str], list[str]]:
    """Collect facts and figures; on rank 0 return (report, warnings, problems)."""
    dev = pick_device(device, local_rank=t.local_rank)
    me = {**t.hellos[t.rank], "rank": t.rank, "device": str(dev), "dtypes": supported_dtypes(dev),
          "memory_available_bytes": memory_available(dev)}
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
    hosts = {n["host"] for n in nodes}
    for n in nodes:
        if len(hosts) > 1 and n["address"] and n["address"].startswith("127."):
            problems.append(f"rank {n['rank']} on {n['host']} advertises loopback {n['address']}: set GLOO_SOCKET_IFNAME")
    if links:
        median_bw = statistics.median(link["gbit_per_s"] for link in links)
        for link in links:
            if link["gbit_per_s"] < 0.5 * median_bw:
                warnings.append(f"link {link['from']}->{link['to']} is much slower than the others ({link['gbit_per_s']:.2f} vs median {median_bw:.2f} Gbit/s)")
            if expect_gbit and link["gbit_per_s"] < 0.7 * expect_gbit:
                warnings.append(f"link {link['from']}->{link['to']} gives {link['gbit_per_s']:.2f} Gbit/s, expected about {expect_gbit:g}")
    return {"nodes": nodes, "links": links, "warnings": warnings, "problems": problems}, warnings, problems


def format_report(report: dict) -> str:
    """The human table for rank 0's stdout."""
    lines = []
    head = ["rank", "host", "os", "python", "torch", "transformers", "torch_pp", "device", "dtypes", "mem avail", "address"]
    rows = [[str(n["rank"]), n["host"], n["os"], n["python"], n["torch"], n["transformers"], n["torch_pp"], n["device"],
             ",".join(d.replace("float", "f").replace("bf", "bf") for d in n["dtypes"]),
             f"{n['memory_available_bytes'] / 2**30:.1f} GiB", f"{n['address']} ({n['iface'] or 'default'})"] for n in report["nodes"]]
    lines += _table(head, rows)
    if report["links"]:
        lines.append("")
        lines += _table(["link", "one-way latency", "bandwidth"],
                        [[f"{l['from']} -> {l['to']}", f"{l['latency_ms']:.3f} ms", f"{l['gbit_per_s']:.2f} Gbit/s"] for l in report["links"]])
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    for p in report["problems"]:
        lines.append(f"problem: {p}")
    lines.append("doctor: " + ("problems found: a run would fail" if report["problems"] else "ok"))
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
