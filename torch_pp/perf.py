"""Turning stage spans into the performance report: time breakdown, Chrome trace, timeline plot.

Pure functions over the output of ``Pipeline.stats(spans_since=t)``: no communication.
"""

from __future__ import annotations

import json


def breakdown(stages: list[dict], *, start: float, end: float) -> list[dict]:
    """Each stage's share of ``[start, end]``: compute, communication (send) and idle (wait).

    On rank 0 everything outside send and wait spans counts as compute (its layers, the LM
    head and generate()'s own work).
    """
    total = end - start
    out = []
    for s in stages:
        spent = {"compute": 0.0, "send": 0.0, "wait": 0.0}
        for name, a, b in s.get("spans", []):
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                spent[name] = spent.get(name, 0.0) + overlap
        if s["rank"] == 0:
            spent["compute"] = max(0.0, total - spent["send"] - spent["wait"])
        idle = max(0.0, total - spent["compute"] - spent["send"])
        out.append({
            "rank": s["rank"], "compute_s": spent["compute"], "communication_s": spent["send"], "idle_s": idle,
            "busy_share": spent["compute"] / total if total > 0 else 0.0,
        })
    return out


def chrome_trace(stages: list[dict], *, start: float | None = None) -> dict:
    """A Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev): one track per stage."""
    t0 = start if start is not None else min((a for s in stages for _, a, _ in s.get("spans", [])), default=0.0)
    events = []
    for s in stages:
        label = f"stage {s['rank']} layers {s['layers'][0]}:{s['layers'][1]} ({s.get('host', '')}, {s.get('device', '')})"
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s["rank"], "args": {"name": label}})
        for name, a, b in s.get("spans", []):
            events.append({"name": name, "cat": name, "ph": "X", "pid": 0, "tid": s["rank"],
                           "ts": round((a - t0) * 1e6, 3), "dur": round((b - a) * 1e6, 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(stages: list[dict], path: str, *, start: float | None = None) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(stages, start=start), f)


COLORS = {"compute": "#2a9d8f", "send": "#e76f51", "wait": "#e9ecef"}


def plot_timeline(stages: list[dict], path: str | None = None, *, start: float | None = None, end: float | None = None, title: str = ""):
    """Plot each stage's spans as a horizontal timeline; save to ``path`` (PNG) if given. Returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t0 = start if start is not None else min((a for s in stages for _, a, _ in s.get("spans", [])), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 + 0.5 * len(stages)))
    for s in stages:
        spans = [(n, a, b) for n, a, b in s.get("spans", []) if end is None or a < end]
        if s["rank"] == 0:  # rank 0's compute is what lies between its send/wait spans
            ax.broken_barh([(0, ((end or max((b for _, _, b in spans), default=t0)) - t0) * 1e3)], (s["rank"] - 0.4, 0.8),
                           facecolors=COLORS["compute"])
        for name in ("wait", "send", "compute"):
            bars = [((a - t0) * 1e3, (b - a) * 1e3) for n, a, b in spans if n == name]
            if bars:
                ax.broken_barh(bars, (s["rank"] - 0.4, 0.8), facecolors=COLORS[name])
    ax.set_yticks([s["rank"] for s in stages], [f"stage {s['rank']}\n{s['layers'][0]}:{s['layers'][1]}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title or "pipeline timeline (green: compute, red: send, grey: waiting)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
