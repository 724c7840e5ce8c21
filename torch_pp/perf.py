"""Timing: rank 0's step timer, and turning stage spans into the performance report.

``StepTimer`` records rank 0's spans as its steps run; the functions (time breakdown, Chrome
trace, timeline plot) read the output of ``Pipeline.stats(spans_since=t)``. No communication.
"""

from __future__ import annotations

import contextlib
import json
import threading

from .devices import stamp
from .trace import Tracer, now


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    return total + (cur_b - cur_a if cur_b is not None else 0.0)


def breakdown(stages: list[dict], *, start: float, end: float) -> list[dict]:
    """Each stage's use of ``[start, end]``: compute, communication (send), idle, and what sets a pace.

    Spans are clipped to the window and merged, so overlapping spans (rank 0 runs one thread
    per lane) count once: compute is the time when any forward pass was running on the stage,
    communication the time spent framing and sending outside compute, idle the rest. On
    rank 0, generate()'s own bookkeeping between forward passes counts as idle.

    Two more figures per stage, for evening the stages out (``Pipeline.balanced_plan``):
    ``occupied_s``, the time it was not waiting for a message (on rank 0 that includes
    generate()'s bookkeeping: the time before it can send the next step; with several lanes or
    requests, only the time when every one of them waits, its ``idle`` spans, is not occupied),
    and ``layers_s``, the time in its own decoder layers (a stage's compute; rank 0's ``layers`` spans).
    """
    total = end - start
    out = []
    for s in stages:
        spans = {"compute": [], "send": [], "wait": [], "layers": [], "idle": []}
        for name, a, b in s.get("spans", []):
            a, b = max(a, start), min(b, end)
            if b > a and name in spans:
                spans[name].append((a, b))
        compute = _union(spans["compute"])
        busy = _union(spans["compute"] + spans["send"])
        out.append({
            "rank": s["rank"], "compute_s": compute, "communication_s": busy - compute, "idle_s": max(0.0, total - busy),
            "busy_share": compute / total if total > 0 else 0.0,
            "occupied_s": max(0.0, total - _union(spans["idle" if s["rank"] == 0 else "wait"])),
            "layers_s": _union(spans["layers"]) if spans["layers"] else compute,
        })
    return out


def window_figures(stages: list[dict], windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Each stage's ``occupied_s`` and ``layers_s`` (see ``breakdown``), summed over ``windows``, in rank order."""
    occupied, layers = [0.0] * len(stages), [0.0] * len(stages)
    for start, end in windows:
        for f in breakdown(stages, start=start, end=end):
            occupied[f["rank"]] += f["occupied_s"]
            layers[f["rank"]] += f["layers_s"]
    return occupied, layers


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


class StepTimer:
    """Rank 0's clock for its steps: the spans ``breakdown`` reads, and the seconds spent on the ring.

    A forward pass on rank 0 computes (``compute``; up to its first remote call also ``layers``,
    its embedding and own decoder layers) until its step goes round the ring, then computes again
    once the answer is back. The stretch's start is kept in the forward's ``rank0.step.Step``.
    ``idle`` spans are the times when every thread inside generate() (``calling``) waits for the
    ring at once: with lanes, one lane's wait is not idle time while another lane computes.

    Attributes:
        tracer: Rank 0's spans (``trace.Tracer``).
        remote_s: Wall time waiting for the other stages: their layers and the wire (with a split
            head, less the head's two parts, computed at the same time).
        calls: Steps that went round the ring and were answered.
        callers: Threads inside generate() now.
    """

    def __init__(self, device) -> None:
        self.device = device
        self.tracer = Tracer()
        self.remote_s = 0.0
        self.calls = 0
        self.callers = 0
        self._waiting = 0
        self._idle_since: float | None = None
        self._count = threading.Lock()

    def begin(self, step) -> None:
        """A forward pass starts on rank 0: compute until its step goes round the ring."""
        step.busy_since, step.in_layers = stamp(self.device), True

    def end(self, step) -> None:
        """A forward pass ended on rank 0."""
        if step.busy_since is not None:
            self.tracer.add("compute", step.busy_since, stamp(self.device))
            step.busy_since = None

    def pause(self, step) -> bool:
        """The step leaves rank 0 (waits for rank 0's queued device work first: not the stages' time).
        Returns whether a compute stretch was open."""
        if step.busy_since is None:
            return False
        until = stamp(self.device)
        self.tracer.add("compute", step.busy_since, until)
        if step.in_layers:  # rank 0's own layers, told apart for ``Pipeline.balanced_plan``
            self.tracer.add("layers", step.busy_since, until)
            step.in_layers = False
        step.busy_since = None
        return True

    def resume(self, step) -> None:
        """The step is back on rank 0."""
        step.busy_since = now()

    def answered(self, seconds: float) -> None:
        """A step's round of the ring took ``seconds``."""
        self.remote_s += seconds
        self.calls += 1

    def record(self, name: str, start: float, end: float | None = None) -> None:
        """A span of rank 0's (``send``, ``wait``, ``compute``) from ``start`` to ``end`` (default: now)."""
        self.tracer.add(name, start, now() if end is None else end)

    @contextlib.contextmanager
    def calling(self, threads: int = 1):
        """``threads`` threads (a call, or its lanes) run generate() steps until the block ends."""
        with self._count:
            self.callers += threads
        try:
            yield
        finally:
            with self._count:
                self.callers -= threads

    @contextlib.contextmanager
    def waiting(self):
        """This thread waits for a reply; the last caller to wait begins an ``idle`` span, the first to stop ends it."""
        with self._count:
            self._waiting += 1
            if self._waiting >= max(self.callers, 1) and self._idle_since is None:
                self._idle_since = now()
        try:
            yield
        finally:
            with self._count:
                self._waiting -= 1
                if self._idle_since is not None:
                    self.tracer.add("idle", self._idle_since, now())
                    self._idle_since = None
