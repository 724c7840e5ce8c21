"""Placements measured on the machines in one run, remembered for the next start (``balance="auto"``).

Why: with several lanes or concurrent requests the most occupied stage sets the pace, and what
occupies a stage is known only on the machines. Rank 0 also embeds, runs the LM head and
generate()'s bookkeeping, and on an accelerator that host work, not the parameter count, sets a
step's time (``bench/RESULTS.md``, "placement"). A plan decides what each rank loads, so a run's
measurement serves the next start: rank 0 times its decode windows as it runs (the pipeline's
``decode_windows``), and when the pipeline closes it keeps the plan that evens them out
(``keep_measured``, through ``balance.measured_plan``) in a small JSON file, keyed by everything
that sets those times: the model, each rank's machine and device, dtype, quantization, split head
and graphs.

The cost model (a rank's fixed time plus a rate per layer) can be wrong: two ranks sharing one
GPU wait for each other's kernels, so rank 0 can stay as occupied with fewer layers, and a plan
re-derived at every close would keep moving layers. So each plan's measured pace is kept too, and
a proposal is tried only while the last move paid; otherwise the start uses the fastest plan tried.

No communication: the stages' figures come from the ``stats`` callable the pipeline passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..options import Settings
from ..perf import window_figures
from .plan import PlanError, StagePlan, parse_layers
from .balance import measured_plan, predicted_times
from .sizing import ModelSizes

log = logging.getLogger("torch_pp")

SCHEMA = 1
MIN_GAIN = 0.03  # a plan is changed only for a predicted pace at least 3% better (measurements move by ~1-2%)
MIN_STEPS = 16  # decode steps a run needs to keep a placement (a chat answer can be a few steps: calls add up)
WINDOWS = 32  # the latest calls whose decode steps count


@dataclass(frozen=True)
class Placement:
    """What one run measured, and the plan it proposes for the next start.

    Attributes:
        plan: The plan to start with next time (``measured_under`` unless another is predicted
            at least ``MIN_GAIN`` faster).
        measured_under: The plan the figures were measured under.
        occupied_ms: Each rank's occupied milliseconds per decode step (not waiting for the ring).
        predicted_ms: The same under ``plan``, as the measured cost model predicts them (the measured
            figures again where ``plan`` was tried before).
        steps: Decode steps measured.
        tried: Each plan measured so far (``measured_under`` included) and its pace: the most
            occupied rank's milliseconds per decode step.
    """

    plan: StagePlan
    measured_under: StagePlan
    occupied_ms: tuple[float, ...]
    predicted_ms: tuple[float, ...]
    steps: int
    tried: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.measured_under.ranges)
        if len(self.plan.ranges) != n or len(self.occupied_ms) != n or len(self.predicted_ms) != n:
            raise PlanError(f"a placement for {n} stages needs {n} ranges and figures")
        if self.steps < 1:
            raise PlanError(f"a placement needs at least one measured step, not {self.steps}")


def measure(sizes: ModelSizes, plan: StagePlan, *, occupied_s: list[float], layers_s: list[float],
            steps: int, tried: dict[str, float] | None = None) -> Placement:
    """The placement that ``occupied_s`` and ``layers_s`` (summed over decode windows of ``steps``
    steps under ``plan``) call for.

    The measured cost model's plan if it is predicted at least ``MIN_GAIN`` faster, has not been
    tried, and ``plan`` itself beat every plan tried before by ``MIN_GAIN`` (the last move paid);
    else the fastest plan tried (``plan`` among them).

    Args:
        tried: Earlier plans' paces (``Placement.tried`` of the run before).

    Raises:
        PlanError: if the figures cannot be measurements of a decode window.
    """
    per_step = 1e3 / steps
    here = plan.spec()
    pace = round(max(occupied_s) * per_step, 3)
    history = {**(tried or {}), here: pace}
    paid = all(pace < other * (1 - MIN_GAIN) for spec, other in history.items() if spec != here)
    proposed = measured_plan(sizes, plan, occupied_s=occupied_s, layers_s=layers_s)
    predicted = predicted_times(sizes, plan, proposed, occupied_s=occupied_s, layers_s=layers_s)
    if not paid or proposed.spec() in history or max(predicted) > max(occupied_s) * (1 - MIN_GAIN):
        proposed = parse_layers(min(history, key=history.get), num_layers=plan.num_layers)
        predicted = predicted_times(sizes, plan, proposed, occupied_s=occupied_s, layers_s=layers_s)
        if proposed == plan:
            predicted = list(occupied_s)
    return Placement(plan=proposed, measured_under=plan, occupied_ms=tuple(round(s * per_step, 3) for s in occupied_s),
                     predicted_ms=tuple(round(s * per_step, 3) for s in predicted), steps=steps,
                     tried=tuple(sorted(history.items())))


def key(*, fingerprint: str, ranks: list[dict], dtype: str, quantize: str | None, split_head: bool | None,
        graphs: bool | None) -> dict:
    """What a measurement holds for: the model, each rank's machine and device (``ranks``: the
    start-up's memory rows), and the options that change a step's time."""
    # A machine is its id and host name together: the address that reaches the store (which
    # ``net.machine.same_machine`` compares too) may change between runs, the measurement does not.
    return {"schema": SCHEMA, "model": fingerprint, "ranks": [[r.get("machine"), r["host"], r["device"]] for r in ranks],
            "dtype": dtype, "quantize": quantize, "split_head": split_head, "graphs": graphs}


def folder(settings: Settings | None = None) -> Path | None:
    """Where placements are kept: ``$TORCH_PP_PLACEMENTS``, else ``placements`` in the cache folder;
    None when that variable is ``off`` (neither used nor kept)."""
    from ..default_model import cache_dir

    settings = settings or Settings.from_env()
    chosen = settings.placements
    if chosen is not None and chosen.lower() in ("off", "0", "none", "false"):
        return None
    return Path(chosen) if chosen else cache_dir(settings) / "placements"


def file_for(k: dict, where: Path) -> Path:
    digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:16]
    return where / f"{digest}.json"


def recall(k: dict, where: Path | None, *, num_layers: int, num_stages: int) -> StagePlan | None:
    """The plan remembered for ``k``, or None (nothing kept, or a file that does not hold one for
    this model's layers and stages: it is then ignored, with a warning if it is unreadable)."""
    record = _read(k, where)
    if record is None:
        return None
    try:
        plan = parse_layers(record["plan"], num_layers=num_layers)
        plan.check_world_size(num_stages)
    except (PlanError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the remembered placement %s: %s", file_for(k, where), exc)
        return None
    return plan


def tried(k: dict, where: Path | None) -> dict[str, float]:
    """The plans measured for ``k`` so far and their paces (see ``Placement.tried``)."""
    record = _read(k, where) or {}
    paces = record.get("tried_ms_per_step")
    return {str(spec): float(pace) for spec, pace in paces.items()} if isinstance(paces, dict) else {}


def _read(k: dict, where: Path | None) -> dict | None:
    """The record kept for ``k``, or None (none kept; one unreadable is ignored with a warning)."""
    if where is None:
        return None
    path = file_for(k, where)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the remembered placement %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) and record.get("key") == k else None


def remember(k: dict, where: Path, placement: Placement) -> Path:
    """Keep ``placement`` for ``k`` (written whole, then renamed: a reader never sees half a file)."""
    path = file_for(k, where)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": k, "plan": placement.plan.spec(), "measured_under": placement.measured_under.spec(),
              "occupied_ms_per_step": list(placement.occupied_ms), "predicted_ms_per_step": list(placement.predicted_ms),
              "steps": placement.steps, "tried_ms_per_step": dict(placement.tried),
              "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)
    return path


def keep_measured(windows, *, stats: Callable[[float], list[dict]], sizes: ModelSizes, plan: StagePlan,
                  placements: tuple[dict, Path] | None) -> Placement | None:
    """Rank 0, at close: keep the placement this run's decode windows call for.

    Args:
        windows: The latest generate() calls' decode windows ``(start, end, steps)``.
        stats: ``Pipeline.stats``'s spans: every stage's figures with its spans since a time.
        sizes: The model's sizes.
        plan: The plan this run ran under.
        placements: Where to keep it (``key``, ``folder``); None: not kept.

    Returns:
        What was kept, or None (nothing kept, or too few decode steps: ``MIN_STEPS``).
    """
    windows = list(windows)
    steps = sum(n for _, _, n in windows)
    if placements is None or steps < MIN_STEPS:
        return None
    occupied, layers = window_figures(stats(min(a for a, _, _ in windows)), [(a, b) for a, b, _ in windows])
    placement = measure(sizes, plan, occupied_s=occupied, layers_s=layers, steps=steps, tried=tried(*placements))
    path = remember(*placements, placement)
    if placement.plan != plan:
        log.info("measured %s ms per decode step on the stages under %s; the next start places %s "
                 "(predicted %s ms; kept in %s)", "/".join(map(str, placement.occupied_ms)), plan.spec(),
                 placement.plan.spec(), "/".join(map(str, placement.predicted_ms)), path)
    return placement
