"""Row moves of a KV cache: the rows of one or more caches, shifted in time, become one batch's cache.

Continuous batching (``rank0.batch``) keeps one KV cache per running batch. A request joins
the batch once its prompt is prefilled in a cache of its own, and leaves when it ends; the
batch's rows are left-padded, as a batched ``generate()`` pads them, so that every row's last
position is the same column. One move describes both: the new cache is the concatenation, along
the batch, of each part's chosen rows, each part shifted right by ``shift`` positions (zeros
on the left, which the attention mask hides) or, with a negative shift, cut on the left
(columns that are padding in every row). Rank 0 and every stage apply the same move to their
own layers' caches (``StageRunner.move_rows``). Pure tensor work: no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import StageError


@dataclass(frozen=True)
class Part:
    """Rows of one source cache in a move.

    Attributes:
        source: The source cache's lane (on the wire) or the cache itself (``move_rows``).
        rows: Which of its rows, in the new cache's order.
        shift: Positions added on the left (zeros) or, negative, removed from the left.
    """

    source: object
    rows: tuple[int, ...]
    shift: int = 0

    def __post_init__(self) -> None:
        if not self.rows or any(not isinstance(r, int) or r < 0 for r in self.rows):
            raise ValueError(f"a row move's part needs row indices of at least one row, got {self.rows!r}")

    def to_wire(self) -> list:
        return [self.source, list(self.rows), self.shift]

    @classmethod
    def from_wire(cls, item) -> "Part":
        source, rows, shift = item
        return cls(int(source), tuple(int(r) for r in rows), int(shift))


def moved_length(parts: list[Part], lengths: list[int]) -> int:
    """The positions the moved cache holds: each part's length plus its shift, the same for all.

    Raises:
        ValueError: if the parts would end at different columns, or a cut removes real positions.
    """
    ends = {length + part.shift for part, length in zip(parts, lengths)}
    if len(ends) != 1 or min(ends) < 0:
        raise ValueError(f"a row move's parts end at different columns: lengths {lengths}, shifts "
                         f"{[p.shift for p in parts]}")
    return ends.pop()


def _shifted(t: torch.Tensor, rows: tuple[int, ...], shift: int) -> torch.Tensor:
    # t: [B, heads, S, D] -> [len(rows), heads, S + shift, D]
    picked = t[list(rows)] if tuple(rows) != tuple(range(t.shape[0])) else t
    if shift > 0:
        return torch.nn.functional.pad(picked, (0, 0, shift, 0))
    return picked[:, :, -shift:] if shift < 0 else picked


def joined(tensors: list[torch.Tensor], parts: list[Part]) -> torch.Tensor:
    """One layer's keys (or values) [B, heads, S, D] of each part's source, as the move makes them:
    each part's rows shifted, concatenated along the batch."""
    return torch.cat([_shifted(t, p.rows, p.shift) for t, p in zip(tensors, parts)])


def move_rows(target: DynamicCache, parts: list[Part], *, layers=None) -> None:
    """Make ``target`` hold the parts' rows (each ``Part.source`` a ``DynamicCache``), in place.

    ``target`` may be one of the sources. Only full-attention layers move (a sliding window's
    cache is a ring buffer whose columns are not positions): callers keep such families out.

    Args:
        target: The cache to fill.
        parts: The rows to take, in order, with their shifts.
        layers: Which layer indices to move (default: all of ``target``'s); the others are left
            as they are (another rank holds them).

    Raises:
        StageError: for a sliding-window layer, or a layer filled in some sources and not others.
    """
    indices = range(len(target.layers)) if layers is None else layers
    for idx in indices:
        sources = [p.source.layers[idx] if idx < len(p.source.layers) else None for p in parts]
        filled = [s is not None and s.get_seq_length() > 0 for s in sources]
        if not any(filled):
            continue
        if not all(filled):
            raise StageError(f"layer {idx}: a row move joins caches of which only some hold this layer")
        if any(getattr(s, "is_sliding", False) for s in sources):
            raise StageError(f"layer {idx} has a sliding window: its rows cannot move (run such models one lane per request)")
        keys, values = joined([s.keys for s in sources], parts), joined([s.values for s in sources], parts)
        layer = target.layers[idx]
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
