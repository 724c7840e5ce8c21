"""Sequence lanes: several sequences in flight at once, so every stage has work.

In a plain pipeline only one stage works at a time. A lane is a sequence (or sub-batch)
with its own KV cache on every stage; while stage 1 works on lane A's step, stage 0 works
on lane B's. Each rank-0 KV cache object is its own lane (``CacheLanes``), so any
``generate()`` calls made at once from several threads run as separate lanes, and the ring
routes each stage reply to the thread that asked (see ``rank0.replies``). ``split_generate``
splits one batched ``generate()`` call into such concurrent sub-batches.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from .workers import POOL


class CacheLanes:
    """Lane ids of rank-0 KV cache objects: a new one for each object on first sight; once an
    object is garbage-collected, ``take_freed`` hands its id back (once), from any thread.

    Deliberately no finalizer and no ``WeakKeyDictionary``: their callbacks are Python code that
    runs wherever the cache dies, which is the end of every ``generate()``; a Ctrl-C landing
    there is printed as "Exception ignored" and dropped by CPython. Plain weak references
    without callbacks run nothing, and dead ones are found when the lanes are next used.
    """

    def __init__(self) -> None:
        self._lanes: dict[int, tuple[weakref.ref, int]] = {}  # id(cache) -> (weak ref, lane)
        self._orphans: list[int] = []  # lanes whose id() a new cache took before they were handed back
        self._sent: dict[int, int] = {}  # lane -> tokens rank 0 has had the stages cache for it
        self._ids = itertools.count(1)  # lane 0: forwards without a cache
        self._lock = threading.Lock()

    def lane_of(self, cache) -> int:
        with self._lock:
            entry = self._lanes.get(id(cache))
            if entry is not None and entry[0]() is cache:
                return entry[1]
            if entry is not None:  # the id of a dead cache, reused
                self._orphans.append(entry[1])
            lane = next(self._ids)
            self._lanes[id(cache)] = (weakref.ref(cache), lane)
        return lane

    def moved_back(self, lane: int, past_len: int, tokens: int) -> bool:
        """Note that ``lane``'s stages will hold ``past_len + tokens`` tokens after this step; returns
        whether ``past_len`` is below what they held after the last one (rank 0's cache was cropped).

        One thread at a time runs a given lane (its cache object is one call's)."""
        held = self._sent.get(lane, 0)
        self._sent[lane] = past_len + tokens
        return past_len < held

    def resized(self, lane: int, length: int) -> None:
        """``lane``'s caches were made to hold ``length`` tokens (a row move): not a crop to follow."""
        self._sent[lane] = length

    def take_freed(self) -> list[int]:
        """The lanes whose cache is gone since the last call."""
        with self._lock:
            dead = [key for key, (ref, _) in self._lanes.items() if ref() is None]
            freed, self._orphans = [*self._orphans, *(self._lanes.pop(key)[1] for key in dead)], []
            for lane in freed:
                self._sent.pop(lane, None)
        return freed


def split_generate(generate, *, lanes: int, pad_with: int, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Split the batch into ``lanes`` sub-batches, generate them concurrently, merge as transformers would.

    Sub-batches that finish early are right-padded with ``pad_with``, as transformers pads
    the finished sequences of one batch.
    """
    parts = [p for p in torch.tensor_split(torch.arange(input_ids.shape[0]), lanes) if len(p)]
    results: list[torch.Tensor | None] = [None] * len(parts)
    errors: list[BaseException] = []

    def run(j: int, rows: torch.Tensor) -> None:
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == input_ids.shape[:1] else v) for k, v in kwargs.items()}
        try:
            results[j] = generate(input_ids=input_ids[rows], **sub)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    # Kept threads, not new ones: a new thread has no cuDNN attention plans (see ``workers``).
    for done in [POOL.submit(run, j, rows) for j, rows in enumerate(parts)]:
        done.result()
    if errors:
        raise errors[0]
    width = max(r.shape[1] for r in results)
    padded = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_with) for r in results]
    return torch.cat(padded, dim=0)
