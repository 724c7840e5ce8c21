"""Several batchers at once, each in a kept thread: routing, how many, and making them (see ``rank0.batch``)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable

from ..errors import OptionsError
from .batch import Batcher, Job
from .workers import POOL


def default_batches(stages: list[dict]) -> int:
    """Batches in flight that may pay for these stages (``Pipeline.stats()``): two where a pipeline has
    several stages and no two of them share an accelerator, so that one batch's step can compute on
    one stage while the other's runs on the next (whether it does is measured: ``many.choose_batches``);
    one where they share it (two stages on one GPU: the second batch would only queue for it) or
    there is one stage."""
    accelerators = [(s["host"], s["device"]) for s in stages if not str(s["device"]).startswith("cpu")]
    return 2 if len(stages) > 1 and len(accelerators) == len(set(accelerators)) else 1


def making(model, rank0, **options) -> Callable[[], Batcher]:
    """Makes batchers on rank 0's pipelined ``model`` (``rank0``: its ``rank0.install.Rank0``; ``options``:
    ``Batcher``'s ``on_logits`` and ``piece``)."""
    release = rank0.ring.release_freed if rank0.ring is not None else (lambda: None)
    return lambda: Batcher(model, turn=rank0.turn, move_rows=rank0.move_rows, release=release, **options)


class Batches:
    """Several batchers, each in a kept thread of its own; a new request goes to the least loaded.

    Args:
        count: Batches in flight (2 lets both stages of a 2-stage pipeline work at once).
        make: Makes one ``Batcher``.
    """

    def __init__(self, count: int, make: Callable[[], Batcher]) -> None:
        if count < 1:
            raise OptionsError(f"batches must be at least 1, got {count}")
        self.batchers = [make() for _ in range(count)]
        self._stop = threading.Event()
        # Kept threads, not new ones: a new thread has no cuDNN attention plans (see ``workers``).
        self._threads = [POOL.submit(b.run, self._stop) for b in self.batchers]

    def submit(self, job: Job) -> Future:
        """Queue ``job`` on the batcher with the fewest requests."""
        return min(self.batchers, key=lambda b: b.load).submit(job)

    def figures(self) -> list[dict]:
        """Each batch's rows, prefilling and queued requests, steps and mean rows per step."""
        return [b.figures() for b in self.batchers]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the threads once their current step is done (cancel the jobs first to end them)."""
        self._stop.set()
        for done in self._threads:
            try:
                done.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a failed step already failed its jobs
                pass
