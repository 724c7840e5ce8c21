"""Placement of layers by work per decode token, counted or measured, and the choice of a run's plan.

Pure arithmetic on ``placement.sizing``'s counts (or on figures a run measured on the machines):
no weights are read.
"""

from __future__ import annotations

from ..options import BALANCES
from .plan import PlanError, StagePlan, check_stage_count, even_plan, parse_layers
from .sizing import DEFAULT_RESERVE, ModelSizes, memory_plan


def compute_plan(sizes: ModelSizes, *, num_stages: int) -> StagePlan:
    """Contiguous layer ranges that give every stage about the same work per decode token.

    Work is counted in parameters multiplied per token: each layer's active parameters, plus
    the LM head on rank 0 (for small models the head weighs as much as several layers, so
    rank 0 gets fewer; of a split head, each its rows). The largest stage is made as small as possible, which is what sets
    the pace when several lanes keep every stage busy. Memory is not considered here.

    Raises:
        PlanError: if there are more stages than layers.
    """
    check_stage_count(num_stages, sizes.num_layers)
    head = [sizes.head_params - sizes.tail_params] + [0] * (num_stages - 2) + [sizes.tail_params]
    return _even_cut(_work(sizes), num_stages, lambda r, work: work + head[r])


def measured_plan(sizes: ModelSizes, plan: StagePlan, *, occupied_s: list[float], layers_s: list[float]) -> StagePlan:
    """Contiguous layer ranges that even out each stage's measured time per decode step.

    What ``compute_plan`` estimates from parameter counts, measured instead on the machines
    themselves under ``plan`` (``torch_pp.perf.breakdown`` of a decode window): each stage's time
    in its layers and its time occupied (not waiting for the ring: its layers plus its fixed
    costs, which on rank 0 are the embedding, the LM head, generate()'s own bookkeeping and
    sending). A rank's layers are taken to cost in proportion to their active parameters at
    that rank's measured rate (rank 0's embedding, measured with its layers, is spread over them),
    its fixed costs to stay where they are; so a slower machine gets
    fewer layers, and rank 0 fewer where its fixed costs are large. With several lanes the most
    occupied stage sets the pace (see ``rank0.lanes``).

    Args:
        sizes: The model's sizes.
        plan: The plan the figures were measured under (every rank with at least one layer).
        occupied_s: Each rank's occupied seconds in the window, in rank order.
        layers_s: Each rank's seconds in its own layers in the same window.

    Raises:
        PlanError: if the figures do not match the plan or cannot be measurements.
    """
    return _even_cut(_work(sizes), len(plan.ranges), _measured_cost(sizes, plan, occupied_s, layers_s))


def predicted_times(sizes: ModelSizes, plan: StagePlan, proposed: StagePlan, *, occupied_s: list[float],
                    layers_s: list[float]) -> list[float]:
    """Each rank's occupied seconds under ``proposed``, as the figures measured under ``plan`` predict
    them (the cost model of ``measured_plan``)."""
    cost, work = _measured_cost(sizes, plan, occupied_s, layers_s), _work(sizes)
    return [cost(r, sum(work[a:b])) for r, (a, b) in enumerate(proposed.ranges)]


def _measured_cost(sizes: ModelSizes, plan: StagePlan, occupied_s: list[float], layers_s: list[float]):
    """``cost(rank, work)`` from figures measured under ``plan``: the rank's fixed seconds plus its
    measured seconds per active parameter times ``work``."""
    n = len(plan.ranges)
    if len(occupied_s) != n or len(layers_s) != n:
        raise PlanError(f"measured figures for {len(occupied_s)} and {len(layers_s)} stages, but the plan has {n}")
    if any(not (0 < lay <= occ * 1.05) for lay, occ in zip(layers_s, occupied_s)):
        raise PlanError(f"not measurements of a decode window: layers {layers_s} s, occupied {occupied_s} s")
    work = _work(sizes)
    rate = [lay / sum(work[a:b]) for lay, (a, b) in zip(layers_s, plan.ranges)]  # seconds per active parameter
    fixed = [max(occ - lay, 0.0) for occ, lay in zip(occupied_s, layers_s)]
    return lambda r, w: fixed[r] + rate[r] * w


def _work(sizes: ModelSizes) -> list[int]:
    """Each layer's parameters multiplied per token."""
    return list(sizes.layer_active_params or sizes.layer_params)


def _even_cut(work: list[float], num_stages: int, cost) -> StagePlan:
    """The contiguous ranges whose most costly stage costs least; ``cost(rank, work)`` is what a
    rank's range of layers with that much work costs it (every rank gets at least one layer)."""
    n = len(work)
    prefix = [0]
    for w in work:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[r][i]: the smallest possible largest stage when stages 0..r cover layers 0..i-1.
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, prefix[i])
    for r in range(1, num_stages):
        for i in range(r + 1, n + 1):
            for j in range(r, i):
                worst = max(best[r - 1][j], cost(r, prefix[i] - prefix[j]))
                if worst < best[r][i]:
                    best[r][i], cut[r][i] = worst, j
    bounds = [n]
    for r in range(num_stages - 1, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    return StagePlan(ranges=tuple(zip(bounds[:-1], bounds[1:])), num_layers=n)


def check_balance(balance: str) -> None:
    """Raises PlanError, naming the choices, for an unknown ``balance``."""
    if balance not in BALANCES:
        raise PlanError(f"balance must be one of {', '.join(BALANCES)}, not {balance!r}")


def choose_plan(sizes: ModelSizes, *, num_stages: int, layers: str | None = None, balance: str = "auto",
                available: list[int] | None = None, dtype: str, context: int, batch: int,
                reserve: int = DEFAULT_RESERVE, quantize: str | None = None) -> StagePlan:
    """The plan for a run: the manual ``layers`` if given, else the ``balance`` placement.

    ``"auto"`` is ``"memory"`` here: what a run measured on the machines (``placement.remembered``)
    is for ``start()`` to try first.

    Raises:
        PlanError: for a bad manual plan, an unknown balance or more stages than layers.
    """
    if layers:
        plan = parse_layers(layers, num_layers=sizes.num_layers)
    elif balance == "even":
        plan = even_plan(num_layers=sizes.num_layers, num_stages=num_stages)
    elif balance == "compute":
        plan = compute_plan(sizes, num_stages=num_stages)
    else:
        check_balance(balance)
        plan = memory_plan(sizes, available=available, dtype=dtype, context=context, batch=batch, reserve=reserve,
                           quantize=quantize)
    plan.check_world_size(num_stages)
    return plan
