"""Build one stage of a Hugging Face model and load only that stage's weights.

The whole model is first built on the meta device (no memory), using the model's
own transformers classes. Modules this rank does not own are then removed (set to
None) or, for the decoder layers, left as empty slots (rank 0 keeps the meta-device
layers it does not own, for ``rank0.install`` to put placeholders in their slots).
Only the owned parameters are read, tensor by tensor, from the safetensors files,
keeping HF parameter names and global layer numbers. No rank materialises weights it
does not own.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .. import archs
from ..devices import max_buffer_bytes, return_freed_memory
from ..placement.plan import StagePlan
from .head import TailHead
from .reader import SafetensorsReader
from .stage import StageRunner
from ..errors import ModelFolderError
from ..placement.config import INDEX_FILE, SINGLE_FILE, read_config
from . import quant


@dataclass
class LoadedStage:
    """This rank's part of the model.

    Attributes:
        model: The HF ``*ForCausalLM`` skeleton holding only this rank's weights.
        runner: On ranks > 0, the runner for this stage's layers.
        weight_bytes: Bytes of parameters this rank holds.
        remote: On rank 0, global layer index -> the meta-device layer another rank owns (its slot
            in the layer list is empty until ``rank0.install`` puts a placeholder there).
        head_cut: The row the LM head is split at (0: whole; see ``model.head``).
    """

    model: PreTrainedModel
    runner: StageRunner | None
    weight_bytes: int
    remote: dict[int, nn.Module] = field(default_factory=dict)
    head_cut: int = 0


def weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it.

    Raises:
        ModelFolderError: if the folder holds no safetensors weights.
    """
    path = Path(model_dir)
    if (path / INDEX_FILE).is_file():
        mapping = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        missing = sorted({f for f in mapping.values() if not (path / f).is_file()})
        if missing:
            raise ModelFolderError(f"{path}/{INDEX_FILE} names weight files that are missing: {', '.join(missing)}")
        return mapping
    if (path / SINGLE_FILE).is_file():
        with SafetensorsReader(path / SINGLE_FILE) as f:
            return {key: SINGLE_FILE for key in f.header}
    raise ModelFolderError(f"{path} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")


def model_fingerprint(model_dir: str | os.PathLike, *, samples: int = 16, chunk: int = 64 * 1024) -> str:
    """A short digest of the model folder: config.json, and each weight file's size and sampled bytes.

    Reads about ``samples * chunk`` bytes per weight file, so machines can cheaply check that
    they hold the same model (same architecture but different weights included).
    """
    path = Path(model_dir)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for fname in sorted(set(weight_map(path).values())):
        size = (path / fname).stat().st_size
        digest.update(f"{fname}:{size}".encode())
        with open(path / fname, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
                digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def build_skeleton(config) -> PreTrainedModel:
    """The full model on the meta device: structure and names, no memory.

    Raises:
        ModelFolderError: for a model whose parts are not laid out as ``archs.LAYOUT`` expects.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    archs.check_layout(model, model_type=config.model_type)
    return model.eval()


def load_stage(
    model_dir: str | os.PathLike,
    *,
    plan: StagePlan,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    quantize: str | None = None,
    head_cut: int = 0,
) -> LoadedStage:
    """Build this rank's stage and read its weights onto ``device`` in ``dtype``.

    Args:
        model_dir: Hugging Face model folder (config.json plus safetensors).
        plan: The stage plan; ``plan.layers_of(rank)`` are loaded.
        rank: This rank.
        device: Where the weights go.
        dtype: Floating dtype of the weights (fp32-only parameters stay fp32).
        progress: Show a progress bar.
        quantize: ``"int8"`` or ``"int4"``: quantize the decoder layers' linear weights as they are read
            (see ``model.quant``).
        head_cut: Split the LM head at this row (0: not split): rank 0 multiplies the rows before it,
            the last stage loads the final norm and the rows from it on (see ``model.head``).

    Raises:
        ModelFolderError: if the folder is unusable or lacks a weight this stage needs.
    """
    config = read_config(model_dir)
    if plan.num_layers != config.num_hidden_layers:
        raise ModelFolderError(f"the plan covers {plan.num_layers} layers but the model has {config.num_hidden_layers}")
    weights = weight_map(model_dir)
    model = build_skeleton(config)
    tail = bool(head_cut) and rank == plan.num_stages - 1
    remote, runner = _trim(model, plan=plan, rank=rank, tail_cut=head_cut if tail else 0), None
    if tail:
        _read_tail_rows(model, Path(model_dir), weights, head_cut, device=device, dtype=dtype)
    _materialise(model, Path(model_dir), weights, device=device, dtype=dtype, rank=rank, plan=plan, progress=progress,
                 quantize=quantize, loaded=(f"{archs.LAYOUT.head}.weight",) if tail else ())
    _rebuild_buffers(model, device=device)
    if rank == 0:
        gen_file = Path(model_dir) / "generation_config.json"
        if gen_file.is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
    else:
        layers = {i: archs.LAYOUT.layer_list(model)[i] for i in plan.layers_of(rank)}
        runner = StageRunner(layers, model.config)
        if tail:
            runner.tail = TailHead(getattr(model, archs.LAYOUT.base).norm, getattr(model, archs.LAYOUT.head))
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ModelFolderError(f"rank {rank}: no weights found for {', '.join(leftovers[:5])}{' …' if len(leftovers) > 5 else ''}")
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *quant.quantized_tensors(model)])
    return LoadedStage(model=model, runner=runner, weight_bytes=weight_bytes, remote=remote, head_cut=head_cut)


def _read_tail_rows(model: PreTrainedModel, model_dir: Path, weights: dict[str, str], cut: int, *,
                    device: torch.device, dtype: torch.dtype) -> None:
    """The last stage's rows ``[cut:]`` of the LM head, read alone from the checkpoint's head (or the
    embedding it is tied to) into the head ``_trim`` left there."""
    name = f"{archs.LAYOUT.head}.weight"
    tied = (getattr(model, "all_tied_weights_keys", None) or {}).get(name)
    plain, _ = _sources(model, weights, {name, *([tied] if tied else [])})
    key = plain.get(name) or plain.get(tied)
    if key is None:
        raise ModelFolderError(f"the checkpoint in {model_dir} has no tensor for {name!r}")
    with SafetensorsReader(model_dir / weights[key]) as f:
        rows = f.read(key, first_row=cut)
    _put(model, name, rows, device=device, dtype=dtype)


def _trim(model: PreTrainedModel, *, plan: StagePlan, rank: int, tail_cut: int = 0) -> dict[int, nn.Module]:
    """Drop or empty every module this rank does not own; on rank 0 return the decoder layers it
    does not own (meta-device modules: their signatures tell the placeholders how they are called).

    With ``tail_cut`` (the last stage of a split head) the final norm stays, and the head becomes a
    head of its rows from ``tail_cut`` on (same name, fewer rows)."""
    owned = plan.layers_of(rank)
    layers = archs.LAYOUT.layer_list(model)
    if rank == 0:
        remote = {i: layers[i] for i in range(owned.stop, plan.num_layers)}
        for i in remote:
            layers[i] = nn.Module()  # an empty slot, until rank0.install puts a placeholder there
        return remote
    for i in range(plan.num_layers):
        if i not in owned:
            layers[i] = nn.Module()  # an empty slot keeps global indices and names
    # Everything outside the decoder layers (embedding, norm, head, rotary, ...) is rank 0's.
    base = getattr(model, archs.LAYOUT.base)
    for name, _ in list(base.named_children()):
        if name != archs.LAYOUT.layers and not (tail_cut and name == "norm"):
            setattr(base, name, None)
    head = getattr(model, archs.LAYOUT.head)
    for name, _ in list(model.named_children()):
        if name != archs.LAYOUT.base:
            setattr(model, name, None)
    if tail_cut:
        setattr(model, archs.LAYOUT.head, nn.Linear(head.in_features, head.out_features - tail_cut, bias=False, device="meta"))
    return {}


def _keep_fp32(model: PreTrainedModel, name: str) -> bool:
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )
    return any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", name) for p in patterns)


def _materialise(model, model_dir: Path, weights: dict[str, str], *, device, dtype, rank, plan, progress,
                 quantize: str | None = None, loaded: tuple[str, ...] = ()) -> None:
    """Read exactly the checkpoint tensors behind this stage's parameters, through transformers' conversion."""
    needed = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(loaded)  # e.g. a split head's rows
    needed |= {n for n, _ in model.named_buffers() if _is_persistent(model, n)}
    plain, fused = _sources(model, weights, needed)
    start, end = plan.ranges[rank]
    bar = tqdm(total=len(plain) + len(fused), desc=f"rank {rank}: loading layers {start}:{end}", unit="tensor",
               disable=not progress, leave=False)
    limit = max_buffer_bytes(device)
    done: set[str] = set()
    with ExitStack() as stack:
        handles: dict[str, SafetensorsReader] = {}

        def read(key: str) -> torch.Tensor:
            fname = weights[key]
            if fname not in handles:
                handles[fname] = stack.enter_context(SafetensorsReader(model_dir / fname))
            return handles[fname].read(key)

        layers_prefix = f"{archs.LAYOUT.base}.{archs.LAYOUT.layers}."

        def put(name: str, tensor: torch.Tensor) -> None:
            if quantize and name in needed and quant.quantizable(model, name, layers_prefix=layers_prefix, mode=quantize):
                # quantized the moment it is read: the stage never holds its full-precision share
                quant.quantize_module(model, name.rpartition(".")[0], tensor, device=device, dtype=dtype, mode=quantize,
                                      consume=True)
                del tensor
                return_freed_memory()  # the full-precision buffer just freed: never let such holes pile up
                done.add(name)
            elif name in needed:
                _put(model, name, tensor, device=device, dtype=torch.float32 if _keep_fp32(model, name) else dtype)
                done.add(name)

        for target, key in plain.items():
            put(target, read(key))
            bar.update()
        for target, (converter, keys) in fused.items():
            if target in needed:
                _check_fits_one_buffer(model, target, dtype, limit, rank=rank)
            converter = copy.deepcopy(converter)  # it collects this target's tensors
            for key, pattern in keys:
                converter.add_tensor(target, key, pattern, functools.partial(read, key))
            for name, tensor in converter.convert(target, model=model, config=model.config).items():
                put(name, tensor)
            bar.update()
    bar.close()
    # Tied parameters the checkpoint leaves out (an LM head that is the embedding) follow their source.
    tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if t in needed and t not in done and s in done}
    for target, source in tied.items():
        module_name, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, model.get_parameter(source))
    missing = sorted(needed - done - set(tied))
    if missing:
        raise ModelFolderError(f"rank {rank}: the checkpoint in {model_dir} has no tensor for {missing[0]!r}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _sources(model, weights: dict[str, str], needed: set[str]) -> tuple[dict[str, str], dict[str, tuple]]:
    """Which checkpoint keys this stage reads: ``(plain, fused)``.

    ``plain`` maps a parameter to the one key it is read from (after transformers' renamings);
    ``fused`` maps a converted target (e.g. all experts of a layer in one tensor) to its converter
    and ``(key, pattern)`` sources, in transformers' own order. Only keys behind this stage's
    parameters are kept, so no rank reads another's tensors.
    """
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = archs.conversions(model)
    modules = {n.rpartition(".")[0] for n in needed}
    known = dict.fromkeys(needed, True)
    plain: dict[str, str] = {}
    fused: dict[str, tuple] = {}
    for key in sorted(weights, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, known)
        if pattern is None:
            if target in needed:
                plain[target] = key
        elif target in needed or target.rpartition(".")[0] in modules:
            converter = next(c for c in converters if pattern in c.source_patterns)
            fused.setdefault(target, (converter, []))[1].append((key, pattern))
    return plain, fused


def _rebuild_buffers(model: nn.Module, *, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies, embedding scales) are in no checkpoint: allocate
    them and let the model's own ``_init_weights`` fill them, as ``from_pretrained`` does; the loaded
    tensors are marked initialised so that it leaves them alone."""
    owners = []
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and not _is_persistent(model, name):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[leaf] = torch.empty_like(buf, device=device)
            owners.append(module)
    if not owners:
        return
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if _is_persistent(model, n)]:
        t._is_hf_initialized = True
    with torch.no_grad():
        for module in dict.fromkeys(owners):
            model._init_weights(module)


def _put(model: nn.Module, name: str, value: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the meta parameter or buffer ``name`` with ``value`` on ``device`` (floats cast to ``dtype``).

    accelerate's ``set_module_tensor_to_device`` would do the same but empties the MPS cache after
    every tensor, which slows loading on a Mac; this is the one path on every device. The copy is
    a blocking one (non-blocking copies to MPS can corrupt data).
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def _check_fits_one_buffer(model: nn.Module, name: str, dtype: torch.dtype, limit: int | None, *, rank: int) -> None:
    """Refuse, before reading it, a fused tensor larger than the device's largest buffer (Metal's)."""
    if limit is None:
        return
    module_name, _, leaf = name.rpartition(".")
    nbytes = getattr(model.get_submodule(module_name), leaf).numel() * dtype.itemsize
    if nbytes > limit:
        raise ModelFolderError(
            f"rank {rank}: {name} (all experts of the layer in one tensor) needs {nbytes / 2**30:.1f} GiB, more than "
            f"this GPU's largest buffer ({limit / 2**30:.1f} GiB); use a smaller dtype"
        )


def _is_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, buf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buf not in module._non_persistent_buffers_set
