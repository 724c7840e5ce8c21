"""Stage plans: which contiguous, half-open range of decoder layers each rank owns.

A plan is pure data. It is computed once (from a layer count and a world size, or
from a user's ``--layers`` spec), validated on construction, and then only read.
Rank 0 always holds the embedding, the final norm and the LM head besides its
layers, which is why the default split gives it the smaller share.
"""

from __future__ import annotations

from dataclasses import dataclass
from ..errors import PlanError


@dataclass(frozen=True)
class StagePlan:
    """Half-open layer ranges ``[start, end)``, one per rank, in rank order.

    Attributes:
        ranges: ``ranges[r]`` is the layer range of rank ``r``.
        num_layers: Number of decoder layers in the model.
    """

    ranges: tuple[tuple[int, int], ...]
    num_layers: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise PlanError(f"the model has {self.num_layers} decoder layers; at least 1 is needed")
        if not self.ranges:
            raise PlanError("a plan needs at least one stage")
        expected = 0
        for rank, (start, end) in enumerate(self.ranges):
            if end <= start:
                raise PlanError(f"stage {rank} ({start}:{end}) is empty; every stage needs at least one layer")
            if start > expected:
                raise PlanError(f"layers {expected}:{start} belong to no stage (gap before stage {rank}, {start}:{end})")
            if start < expected:
                raise PlanError(f"layers {start}:{expected} are given twice (stage {rank}, {start}:{end}, overlaps the stage before)")
            expected = end
        if expected != self.num_layers:
            if expected < self.num_layers:
                raise PlanError(f"layers {expected}:{self.num_layers} belong to no stage (the model has {self.num_layers} layers)")
            raise PlanError(f"the plan reaches layer {expected}, but the model has only {self.num_layers} layers")

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    def layers_of(self, rank: int) -> range:
        """The global layer indices that ``rank`` owns."""
        start, end = self.ranges[rank]
        return range(start, end)

    def stage_of_layer(self, layer: int) -> int:
        """The rank that owns global layer ``layer``."""
        for rank, (start, end) in enumerate(self.ranges):
            if start <= layer < end:
                return rank
        raise IndexError(f"layer {layer} is outside 0:{self.num_layers}")

    def spec(self) -> str:
        """The plan in ``--layers`` syntax, e.g. ``"0:10,10:30"``."""
        return ",".join(f"{s}:{e}" for s, e in self.ranges)

    def check_world_size(self, world_size: int) -> None:
        """Raise PlanError unless there is exactly one range per rank."""
        if self.num_stages != world_size:
            raise PlanError(
                f"the plan has {self.num_stages} stages ({self.spec()}) but {world_size} ranks were started; "
                "give one layer range per rank"
            )


def check_stage_count(num_stages: int, num_layers: int) -> None:
    """Raise PlanError unless every one of ``num_stages`` stages can get at least one of ``num_layers`` layers."""
    if num_stages < 1:
        raise PlanError(f"need at least one stage, got {num_stages}")
    if num_stages > num_layers:
        raise PlanError(
            f"{num_stages} stages for a model with {num_layers} layers: every stage needs at least one layer; "
            f"start at most {num_layers} ranks"
        )


def even_plan(*, num_layers: int, num_stages: int) -> StagePlan:
    """Split layers as evenly as possible; rank 0 gets the smaller share.

    Rank 0 also carries the embedding, final norm and LM head, so when the layers
    do not divide evenly, the extra layers go to the last ranks.

    Args:
        num_layers: Decoder layers in the model.
        num_stages: Number of ranks.

    Raises:
        PlanError: if there are more stages than layers.
    """
    check_stage_count(num_stages, num_layers)
    base, extra = divmod(num_layers, num_stages)
    sizes = [base] * (num_stages - extra) + [base + 1] * extra
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return StagePlan(ranges=tuple(ranges), num_layers=num_layers)


def parse_layers(spec: str, *, num_layers: int) -> StagePlan:
    """Parse a ``--layers`` spec such as ``"0:10,10:30"`` into a validated plan.

    Raises:
        PlanError: if the spec is malformed or the ranges do not cover every layer exactly once.
    """
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        try:
            start_s, end_s = part.split(":")
            ranges.append((int(start_s), int(end_s)))
        except ValueError:
            raise PlanError(f"bad layer range {part!r} in --layers {spec!r}; expected START:END, e.g. 0:10,10:30") from None
    return StagePlan(ranges=tuple(ranges), num_layers=num_layers)
