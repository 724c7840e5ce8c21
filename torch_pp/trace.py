"""Per-stage timing spans: where each stage spends its time (compute, send, wait).

Every rank keeps a bounded list of spans ``(name, start, end)`` in wall-clock seconds
(``time.time()`` scale, measured with ``perf_counter`` precision), so spans of ranks on
one machine line up; across machines they are only as aligned as the clocks.
Names: ``compute`` (the stage's own math; on rank 0 its forward passes less the remote calls),
``layers`` (on rank 0, a forward pass up to its first remote call: the embedding and its own
decoder layers, inside ``compute``),
``send`` (framing and handing a message to Gloo), ``wait`` (blocked on the next message:
idle time plus the upstream transfer), ``idle`` (on rank 0, while every thread running
generate() waits for the ring: with lanes, one lane's wait is not idle time).
"""

from __future__ import annotations

import time
from collections import deque

_EPOCH = time.time() - time.perf_counter()


def now() -> float:
    """Wall-clock seconds with perf_counter's resolution."""
    return _EPOCH + time.perf_counter()


class Tracer:
    """A bounded record of spans for one rank."""

    def __init__(self, maxlen: int = 200_000) -> None:
        self.spans: deque[tuple[str, float, float]] = deque(maxlen=maxlen)

    def add(self, name: str, start: float, end: float) -> None:
        if end > start:
            self.spans.append((name, start, end))

    def since(self, t: float) -> list[list]:
        """Spans that end after ``t``, as JSON-friendly lists."""
        return [[n, s, e] for n, s, e in self.spans if e > t]
