"""How much memory each stage needs, and placement of layers by memory (by work: ``placement.balance``).

Everything here is pure arithmetic on a config: parameter counts come from the
model's own transformers classes built on the meta device (so MoE layers, dense
layers, MLA and tied embeddings are counted exactly as they will be loaded), and
KV-cache sizes from the attention shapes. No weights are read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from .. import archs
from ..options import INT4_GROUP
from ..tables import table
from .plan import PlanError, StagePlan, check_stage_count

# Bytes per parameter; the integer widths are for planning quantised checkpoints.
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "8bit": 1.0, "int4": 0.5, "4bit": 0.5}
KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 2, "8bit": 2, "int4": 2, "4bit": 2}  # caches stay 16-bit
DEFAULT_RESERVE = 1 * 2**30  # runtime, activations and framework per rank


@dataclass(frozen=True)
class ModelSizes:
    """Per-part parameter counts and per-token KV-cache elements of one model.

    Attributes:
        layer_params: Parameters of each decoder layer, by global index.
        rank0_params: Embedding + final norm + LM head (counted once when tied).
        kv_elems_per_token: Cached K and V elements per token, for each layer.
        kv_window: Sliding window per layer (None for full attention).
        layer_active_params: Parameters each decoder layer multiplies per token (MoE layers
            count their shared experts and only ``num_experts_per_tok`` routed ones).
        head_params: Parameters of the LM head, which rank 0 multiplies for every decode token.
        layer_linear_params: Parameters of each layer's ``nn.Linear`` weights (what ``--quantize`` shrinks).
        layer_linear_rows: Output channels of those weights (one quantization scale each).
        head_rows: Rows (vocabulary) of the LM head where it can be split between rank 0 and the
            last stage (a bias-free linear head after a final norm at ``<base>.norm``); else 0.
        head_cut: As placed: the head rows rank 0 multiplies while the last stage multiplies the
            rest (0: not split; see ``head_split`` and ``model.head``).
        draft: The sizes of a draft model rank 0 holds whole for speculative decoding (its weights
            and its KV cache count on rank 0; see ``draft_bytes``), or None.
    """

    layer_params: tuple[int, ...]
    rank0_params: int
    kv_elems_per_token: tuple[int, ...]
    kv_window: tuple[int | None, ...]
    layer_active_params: tuple[int, ...] = ()
    head_params: int = 0
    layer_linear_params: tuple[int, ...] = ()
    layer_linear_rows: tuple[int, ...] = ()
    head_rows: int = 0
    head_cut: int = 0
    draft: "ModelSizes | None" = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def tail_params(self) -> int:
        """Parameters of the head rows the last stage holds (0: the head is not split)."""
        return self.head_params * (self.head_rows - self.head_cut) // self.head_rows if self.head_cut else 0


ROW_BLOCK = 64  # a cut between head rows at a multiple of this keeps CPU kernels' blocking of rows
SPLIT_HEAD_MIN_BYTES = 16 * 2**20  # the last stage's part: about 1 ms of a CPU's memory bandwidth or more


def split_rows(rows: int) -> int:
    """The head rows rank 0 multiplies when the head is split: about half (0: too few to split)."""
    return rows // 2 // ROW_BLOCK * ROW_BLOCK


def head_split(sizes: ModelSizes, *, num_stages: int, dtype: str, devices: list[str], wanted: bool | None) -> ModelSizes:
    """``sizes`` with ``head_cut`` set: whether (and where) the LM head is split between rank 0 and
    the last stage, which then multiply their rows of it at the same time (see ``model.head``).

    Automatic (``wanted`` None): where it pays, i.e. where rank 0 and the last stage compute on CPUs
    and the last stage's part is at least ``SPLIT_HEAD_MIN_BYTES``: a CPU reads weights at 10-20 GB/s,
    so that part takes over 1 ms, against about 0.5 ms for the extra message. An accelerator
    multiplies such a part in a fraction of that. One stage: nothing to split with.

    Args:
        devices: Each rank's device (``"cpu"``, ``"cuda:0"``, ``"mps"``), in rank order.

    Raises:
        PlanError: for ``wanted`` True and a head that cannot be split.
    """
    cut = split_rows(sizes.head_rows)
    if wanted and not cut and num_stages > 1:
        raise PlanError("split_head=True: this model's head cannot be split (it needs a bias-free linear head after a "
                        f"final norm at {archs.LAYOUT.base}.norm and at least {2 * ROW_BLOCK} rows); leave split_head unset")
    split = dataclasses.replace(sizes, head_cut=0 if num_stages < 2 or wanted is False else cut)
    if wanted is None and split.head_cut:
        on_cpus = all(d.split(":")[0] == "cpu" for d in (devices[0], devices[-1]))
        if not (on_cpus and split.tail_params * BYTES_PER_PARAM[dtype] >= SPLIT_HEAD_MIN_BYTES):
            split = sizes
    return split


def model_sizes(config) -> ModelSizes:
    """Count parameters and KV-cache widths of ``config`` without allocating anything."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    archs.check_layout(model, model_type=config.model_type)
    counts: dict[int, int] = {}
    active: dict[int, float] = {}
    routed = archs.routed_fraction(config)
    layers = rf"{archs.LAYOUT.base}\.{archs.LAYOUT.layers}\.(\d+)\."
    linear: dict[int, int] = {}
    rows: dict[int, int] = {}
    for name, module in model.named_modules():
        m = re.match(layers, name + ".")
        if m and type(module) is torch.nn.Linear:
            i = int(m.group(1))
            linear[i] = linear.get(i, 0) + module.weight.numel()
            rows[i] = rows.get(i, 0) + module.out_features
    rank0 = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        if id(p) in seen:
            continue
        seen.add(id(p))
        m = re.match(layers, name)
        if m:
            i = int(m.group(1))
            counts[i] = counts.get(i, 0) + p.numel()
            active[i] = active.get(i, 0) + p.numel() * (routed if archs.is_routed_expert(name) else 1)
        else:
            rank0 += p.numel()
    n = config.num_hidden_layers
    kv = [archs.kv_elems_per_token(config, i) for i in range(n)]
    window = [archs.kv_window(config, i) for i in range(n)]
    head = model.get_output_embeddings()
    splittable = (type(head) is torch.nn.Linear and head.bias is None
                  and isinstance(getattr(getattr(model, archs.LAYOUT.base), "norm", None), torch.nn.Module))
    return ModelSizes(tuple(counts.get(i, 0) for i in range(n)), rank0, tuple(kv), tuple(window),
                      layer_active_params=tuple(int(active.get(i, 0)) for i in range(n)),
                      head_params=head.weight.numel() if head is not None else 0,
                      layer_linear_params=tuple(linear.get(i, 0) for i in range(n)),
                      layer_linear_rows=tuple(rows.get(i, 0) for i in range(n)),
                      head_rows=head.out_features if splittable else 0)


@dataclass(frozen=True)
class StageNeed:
    """What one stage needs, in bytes."""

    rank: int
    layers: tuple[int, int]
    weight_bytes: int
    kv_bytes: int
    reserve_bytes: int
    available_bytes: int | None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.reserve_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.available_bytes is None else self.available_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.headroom_bytes >= 0


def layer_bytes(sizes: ModelSizes, *, dtype: str, context: int, batch: int,
                quantize: str | None = None) -> list[tuple[int, int]]:
    """(weight bytes, KV bytes) of each layer; with ``quantize`` its linear weights are counted
    quantized (see ``quantized_bytes``)."""
    per = BYTES_PER_PARAM[dtype]
    linear = sizes.layer_linear_params or (0,) * sizes.num_layers
    rows = sizes.layer_linear_rows or (0,) * sizes.num_layers
    out = []
    for i, (params, kv, win) in enumerate(zip(sizes.layer_params, sizes.kv_elems_per_token, sizes.kv_window)):
        tokens = min(context, win) if win else context
        weights = params * per if not quantize else (params - linear[i]) * per + quantized_bytes(
            linear[i], rows[i], mode=quantize, dtype=dtype)
        out.append((int(weights), batch * tokens * kv * KV_BYTES[dtype]))
    return out


def quantized_bytes(params: int, rows: int, *, mode: str, dtype: str) -> float:
    """Bytes of ``params`` linear weights with ``rows`` output channels, quantized by ``mode``.

    int8: one byte per parameter and one scale per output channel; int4: half a byte per
    parameter and a scale and a zero per ``INT4_GROUP`` inputs. Scales are in the
    kernel's dtype, bfloat16 for a float32 model (``model.quant.kernel_dtype``).
    """
    scale = 2 if dtype == "float32" else BYTES_PER_PARAM[dtype]
    if mode == "int8":
        return params + rows * scale
    return params / 2 + 2 * params / INT4_GROUP * scale


def stage_needs(sizes: ModelSizes, plan: StagePlan, *, dtype: str, context: int, batch: int,
                available: list[int] | None = None, reserve: int = DEFAULT_RESERVE,
                quantize: str | None = None) -> list[StageNeed]:
    """Bytes each stage of ``plan`` needs, with ``available`` memory per rank if known."""
    per_layer = layer_bytes(sizes, dtype=dtype, context=context, batch=batch, quantize=quantize)
    needs = []
    draft_w, draft_kv = draft_bytes(sizes, dtype=dtype, context=context, batch=batch)
    for r, (start, end) in enumerate(plan.ranges):
        w = sum(per_layer[i][0] for i in range(start, end)) + _fixed_bytes(sizes, r, len(plan.ranges), dtype)
        kv = sum(per_layer[i][1] for i in range(start, end)) + (draft_kv if r == 0 else 0)
        needs.append(StageNeed(r, (start, end), w, kv, reserve, None if available is None else available[r]))
    return needs


def draft_bytes(sizes: ModelSizes, *, dtype: str, context: int, batch: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) of the draft model on rank 0, at ``dtype`` and the pipeline's context
    and batch ((0, 0) without one)."""
    draft = sizes.draft
    if draft is None:
        return 0, 0
    parts = layer_bytes(draft, dtype=dtype, context=context, batch=batch)
    return (sum(w for w, _ in parts) + int(draft.rank0_params * BYTES_PER_PARAM[dtype]), sum(kv for _, kv in parts))


def sizes_from_json(data: dict) -> ModelSizes:
    """A ``ModelSizes`` from its ``dataclasses.asdict`` as JSON (rank 0 counts a draft only it can read)."""
    data = dict(data)
    if data.get("draft") is not None:
        data["draft"] = sizes_from_json(data["draft"])
    return ModelSizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _fixed_bytes(sizes: ModelSizes, rank: int, num_stages: int, dtype: str) -> int:
    """Weights a rank holds besides its layers: rank 0's embedding, final norm and head; the last
    stage's rows of a split head."""
    params = sizes.rank0_params if rank == 0 else sizes.tail_params if rank == num_stages - 1 else 0
    draft = draft_bytes(sizes, dtype=dtype, context=0, batch=0)[0] if rank == 0 else 0
    return int(params * BYTES_PER_PARAM[dtype]) + draft


def memory_plan(sizes: ModelSizes, *, available: list[int], dtype: str, context: int, batch: int,
                reserve: int = DEFAULT_RESERVE, quantize: str | None = None) -> StagePlan:
    """Contiguous layer ranges in proportion to each rank's free memory.

    A rank's free memory is what it reports less its fixed costs (the runtime reserve, and on
    rank 0 the embedding, final norm and LM head, and a draft model with its KV cache). Layers (weights plus KV cache) are cut so that
    each rank's share of their total follows its share of the free memory; every rank gets at
    least one layer. Whether the result fits is for ``stage_needs`` to say.

    Raises:
        PlanError: if there are more ranks than layers.
    """
    n_ranks, n_layers = len(available), sizes.num_layers
    check_stage_count(n_ranks, n_layers)
    cost = [w + kv for w, kv in layer_bytes(sizes, dtype=dtype, context=context, batch=batch, quantize=quantize)]
    fixed = [reserve + _fixed_bytes(sizes, r, n_ranks, dtype) for r in range(n_ranks)]
    fixed[0] += draft_bytes(sizes, dtype=dtype, context=context, batch=batch)[1]
    free = [max(a - f, 1) for a, f in zip(available, fixed)]
    total = sum(cost)
    bounds, acc, i = [0], 0, 0
    for r in range(n_ranks - 1):
        target = total * sum(free[: r + 1]) / sum(free)
        # Advance while the next layer's midpoint is still within this rank's target.
        while i < n_layers - (n_ranks - r - 1) and (i == bounds[-1] or acc + cost[i] / 2 <= target):
            acc += cost[i]
            i += 1
        bounds.append(i)
    bounds.append(n_layers)
    return StagePlan(ranges=tuple(zip(bounds[:-1], bounds[1:])), num_layers=n_layers)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{n} B"


def needs_table(needs: list[StageNeed]) -> str:
    head = ["stage", "layers", "weights", "KV cache", "reserve", "total", "available", "headroom", "fits"]
    rows = [[str(s.rank), f"{s.layers[0]}:{s.layers[1]}", format_bytes(s.weight_bytes), format_bytes(s.kv_bytes),
             format_bytes(s.reserve_bytes), format_bytes(s.total_bytes), format_bytes(s.available_bytes),
             format_bytes(s.headroom_bytes), "yes" if s.fits else "NO"] for s in needs]
    return "\n".join(table(head, rows))
