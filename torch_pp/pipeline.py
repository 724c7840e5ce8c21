"""Start a pipeline: one call on every rank, the driver's model on rank 0.

``start()`` runs the same steps on every rank, each ending in an agreement so
that a problem anywhere stops every rank with one message: resolve the model
folder and the plan, then load this rank's share of the weights. On rank 0 it
returns a ``Pipeline`` whose ``model`` is an HF model with ``generate()``; on the
other ranks it serves the stage and returns once rank 0 closes the pipeline.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ._version import __version__
from .default_model import ensure_default_model
from .devices import (cap_memory, checkpoint_dtype, choose_attention_kernels, dtype_name, memory_available,
                      peak_memory_bytes, pick_device, pick_dtype)
from .model import graphs
from . import archs
from .model.loading import LoadedStage, load_stage, model_fingerprint
from .model.stage import layer_arguments
from .model.quant import check_supported as check_quantize
from .placement.config import read_config
from .options import OptionsError, StartOptions
from .placement import remembered
from .placement.plan import PlanError, StagePlan, parse_layers
from .perf import window_figures
from .rank0.install import Rank0, install
from .rank0.draft import draft_on_slots, load_draft
from .rank0.local import LocalLayers
from .rank0.speculation import Cutoff
from .rank0.batches import making
from .rank0.many import generate_many
from .runtime.agreement import agree, agree_on
from .runtime.serve import serve
from .trace import now
from .placement.balance import choose_plan, measured_plan
from .placement.sizing import (DEFAULT_RESERVE, head_split, model_sizes, needs_table,
                               sizes_from_json, stage_needs)
from .net.machine import keep_awake, same_machine
from .net.transport import Transport

log = logging.getLogger("torch_pp")
# An assisted call whose proposals keep failing decodes plainly for the rest of the call (see
# ``rank0.speculation.Cutoff``; the figures behind it: ``bench/RESULTS.md``, "speculation").
SPECULATION_CUTOFF = Cutoff()

@dataclass(eq=False)
class Pipeline:
    """A running pipeline, as seen from one rank.

    Attributes:
        model: On rank 0, the HF ``*ForCausalLM`` whose forward runs every stage; None elsewhere.
        model_dir: The Hugging Face model folder.
        plan: Layer ranges per rank.
        transport: The ring's transport.
        owns_transport: Whether ``close()`` also leaves the process group.
        on_close: Callbacks run once by ``close()``, after the stages have ended (e.g. reaping
            the worker processes a notebook started).
        device: This rank's device.
        dtype: This rank's compute dtype.
        stage: This rank's loaded share.
        rank0: On rank 0, what runs beside the model: the ring, the placeholders' span, the timer,
            the device turn, the split head (``rank0.install.Rank0``); None elsewhere.
        placements: On rank 0, where this run's measured placement is kept for the next start
            (``placement.remembered``: its key and folder); None: not kept.
        decode_windows: On rank 0, the latest generate() calls' decode windows ``(start, end, steps)``.
        draft: On rank 0, the draft model of ``draft_model`` (None without one).
        draft_layers: On rank 0, the draft's layers over slots (``rank0.local``; None: as loaded).
        placed_by: What chose the plan: ``"layers"`` (given), ``"measured"`` (kept from an earlier
            run, see ``placement.remembered``) or the balance (``"memory"``, ``"compute"``, ``"even"``).
    """

    model: torch.nn.Module | None
    model_dir: Path
    plan: StagePlan
    transport: Transport
    device: torch.device
    dtype: torch.dtype
    stage: LoadedStage
    rank0: Rank0 | None = None
    load_s: float = 0.0  # seconds this rank spent reading its weights
    owns_transport: bool = False  # close() also leaves the process group
    on_close: list[Callable[[], None]] = field(default_factory=list)  # run once, after the stages have ended
    placements: tuple[dict, Path] | None = None
    placed_by: str = "memory"
    draft: torch.nn.Module | None = None
    draft_layers: LocalLayers | None = None
    decode_windows: collections.deque = field(default_factory=lambda: collections.deque(maxlen=remembered.WINDOWS))
    _closed: bool = False

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def is_driver(self) -> bool:
        return self.transport.rank == 0

    def describe(self) -> dict:
        """This rank's figures: rank, host, layers, device, dtype, weight bytes, peak memory, how
        its own layers' decode steps ran (``StageRunner.figures``; ``graphs`` alone where off) and,
        with the LM head split, its rows and steps of it (``model.head``)."""
        start, end = self.plan.ranges[self.rank]
        return {
            "rank": self.rank,
            "host": self.transport.host,
            "layers": [start, end],
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "weight_bytes": self.stage.weight_bytes,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            **(self.stage.runner.figures() if self.stage.runner is not None else
               self.rank0.figures() if self.rank0 is not None else {"graphs": "off"}),
            **({"draft": self.draft_layers.figures()} if self.draft_layers is not None else {}),
        }

    def stats(self, *, spans_since: float | None = None) -> list[dict]:
        """Every stage's figures, in rank order (rank 0 only).

        Args:
            spans_since: Also return each stage's timing spans that end after this
                ``torch_pp.trace.now()`` time (see ``torch_pp.perf``).
        """
        if not self.is_driver:
            raise RuntimeError("stats() is for rank 0")
        ring = self.rank0.ring
        remote = ring.collect_stats(spans_since=spans_since) if ring else []
        mine = self.describe()
        if spans_since is not None:
            mine["spans"] = self.rank0.timer.tracer.since(spans_since) if ring else []
        return [mine, *remote]

    def balanced_plan(self, *, spans_since: float, until: float | None = None) -> StagePlan:
        """A plan that evens out the stages' time per decode step, measured in a window of this run.

        With several lanes or concurrent requests the most occupied stage sets the pace, and
        what occupies each stage is best measured on the machines themselves: rank 0 also embeds,
        runs the LM head and generate()'s bookkeeping, and machines differ in speed. Run a few
        decode steps of the batch size you mean to serve, in one lane, then restart with
        ``layers=plan.spec()`` (see ``placement.balance.measured_plan``). Rank 0 only.

        Args:
            spans_since: Start of the window (a ``torch_pp.trace.now()`` time): best after the
                prompt's prefill, so that the window is decode steps.
            until: End of the window (default: now).

        Raises:
            PlanError: if the window holds no decode step of every stage.
        """
        occupied, layers = window_figures(self.stats(spans_since=spans_since),
                                          [(spans_since, until if until is not None else now())])
        return measured_plan(model_sizes(read_config(self.model_dir)), self.plan, occupied_s=occupied, layers_s=layers)

    def generate_many(self, prompts, *, batches: int = 1, **sampling):
        """Many prompts through continuous batching (as ``torch_pp serve`` runs requests), yielding
        ``rank0.many.Finished`` as each finishes, its tokens equal to that prompt alone; rank 0 only.
        Arguments: see ``rank0.many.generate_many`` (``max_new_tokens`` required)."""
        if not self.is_driver:
            raise RuntimeError("generate_many() is for rank 0")
        tokenizer = self.tokenizer() if any(isinstance(p, str) for p in prompts) else None
        return generate_many(making(self.model, self.rank0), prompts, tokenizer=tokenizer, batches=batches, **sampling)

    def _remember_placement(self) -> None:
        """Rank 0, at close: keep the placement this run's decode windows call for (``placement.remembered``)."""
        remembered.keep_measured(self.decode_windows, stats=lambda since: self.stats(spans_since=since),
                                 sizes=model_sizes(read_config(self.model_dir)), plan=self.plan, placements=self.placements)

    def tokenizer(self):
        """The model folder's tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def close(self) -> None:
        """End the session on every stage (rank 0), and leave the process group if ``start`` joined it."""
        if self._closed:
            return
        self._closed = True
        ring = self.rank0.ring if self.rank0 is not None else None
        if ring is not None:
            if not ring.lost:  # after a lost stage there is no ring left to go round
                try:
                    self._remember_placement()
                except Exception as exc:  # noqa: BLE001 - a measurement must never stop a close
                    log.warning("rank 0 (%s): could not keep this run's measured placement: %s", self.transport.host, exc)
                ring.shutdown()
            ring.closed = True
        try:
            if self.owns_transport:
                self.transport.close()
        finally:
            for hook in self.on_close:
                hook()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(
    model: str | os.PathLike | None = None,
    *,
    options: StartOptions | None = None,
    transport: Transport | None = None,
    **fields,
) -> Pipeline:
    """Start the pipeline on this rank; call it on every rank with the same arguments.

    Args:
        model: Hugging Face model folder (config.json, safetensors, tokenizer). None: the
            embedded SmolLM2-135M-Instruct.
        options: All start options at once (a ``StartOptions``); or give its fields as keywords:
        layers: Manual plan such as ``"0:10,10:30"``; overrides ``balance``.
        balance: ``"auto"`` (the placement measured on these machines at an earlier run of this
            model with the same options, if it fits the memory now, else ``"memory"``: see
            ``placement.remembered``; rank 0 measures its decode steps as it runs and keeps what they
            call for when it closes), ``"memory"`` (layers in proportion to each rank's free memory, counting rank 0's
            embedding and head and the KV cache), ``"compute"`` (equal work per decode token,
            counting rank 0's LM head: best for several lanes) or ``"even"`` (equal layer counts).
            Every placement is checked against each rank's memory.
        context: Tokens per sequence the KV cache is sized for when placing and checking the fit.
        batch: Sequences the KV cache is sized for.
        prefill_chunk: Tokens per chunk of a pipelined prefill (None: about four chunks per
            stage; 0: no chunking). Changeable later as ``pipeline.model.prefill_chunk``.
        max_memory: Bytes this rank may use; default: what the device reports (shared equally by
            the ranks on one machine or GPU).
        device: ``mps``, ``cuda`` or ``cpu``; default: the best available.
        dtype: ``float32``, ``float16`` or ``bfloat16``; default: per device.
        progress: Show progress bars (on the first rank of each machine).
        quantize: ``"int8"`` or ``"int4"``: each stage quantizes its decoder layers' linear weights as it
            reads them (weight-only: int8 per output channel, int4 per 32 inputs); embeddings and
            the LM head stay in ``dtype``.
        split_head: Split the LM head's rows between rank 0 and the last stage, which multiply
            them at the same time after the last stage's layers (see ``model.head``). None: where it
            pays (rank 0 and the last stage on CPUs, the last stage's rows at least 16 MiB); True:
            whenever the model's head allows it; False: off.
        graphs: Every stage's decode steps, rank 0's own layers included, as captured CUDA graphs over
            KV caches preallocated for ``context`` tokens per sequence (see ``model.graphs`` and
            ``rank0.local``). None: on for CUDA stages of the families that allow it; True: required
            (on a CPU or Mac the same steps run eagerly); False: off.
        draft_model: A Hugging Face folder of a small model of the same tokenizer, loaded on rank 0 only
            (its weights and KV cache counted in rank 0's placement): generate() calls of one
            sequence are then assisted by it (speculative decoding: see ``rank0.speculation``), unless
            they pass ``assistant_model=None`` or ``prompt_lookup_num_tokens``.
        transport: An existing transport to reuse; default: join torchrun's group (or run alone).

    Returns:
        On rank 0, the running pipeline (use ``pipeline.model.generate``). On other ranks, the
        closed pipeline, after rank 0 has closed it.

    Raises:
        OptionsError: for an option out of range, before anything is joined.
        TypeError: for an unknown option, likewise.
        StartupError: on every rank, if any rank could not resolve, plan or load its stage.
    """
    if options is None:
        options = StartOptions(model=None if model is None else str(model), **fields)
    elif fields or model is not None:
        raise TypeError("start() takes either options=StartOptions(...) or the options as keywords, not both")
    owns = transport is None
    transport = transport or Transport.from_env()
    awake = keep_awake()  # a Mac that idle-sleeps would be declared lost by the other stages
    try:
        model_dir, plan, dev, dt, stage, local, draft, load_s, placements, placed_by = _prepare_and_load(transport, options)
    except BaseException:
        if awake is not None:
            awake.terminate()
        if owns:
            transport.close()
        raise
    pipe = Pipeline(
        model=stage.model if transport.rank == 0 else None,
        model_dir=model_dir, plan=plan, transport=transport, device=dev, dtype=dt, stage=stage, load_s=load_s,
        owns_transport=owns, placements=placements, placed_by=placed_by, draft=draft,
    )
    if awake is not None:
        pipe.on_close.append(awake.terminate)
    if transport.rank == 0:
        _drive(pipe, options, local)
        return pipe
    try:
        serve(transport, stage.runner, device=dev, describe=pipe.describe)
    finally:
        pipe.close()
    return pipe


def _prepare_and_load(transport: Transport, o: StartOptions):
    """Every rank: resolve the folder and device, agree on a plan, load this rank's share."""
    show = o.progress and transport.local_rank == 0

    def prepare():
        # Whichever rank wins the conversion lock converts, so each may show that one bar.
        model_dir = Path(o.model) if o.model is not None else ensure_default_model(progress=o.progress)
        config = read_config(model_dir)
        sizes = model_sizes(config)  # refuses a model whose layers are not where archs.LAYOUT says, before any weight
        dev = pick_device(o.device, local_rank=transport.local_rank)
        hello = transport.hellos[transport.rank]
        memory = {"host": transport.host, "machine": hello.get("machine"), "route": hello.get("route"), "device": str(dev), "capped": o.max_memory is not None,
                  "bytes": o.max_memory if o.max_memory is not None else memory_available(dev)}
        dt = pick_dtype(o.dtype, dev, checkpoint_dtype(config))
        check_quantize(o.quantize, device=dev, dtype=dt)  # refused with the reason, before anything is read
        # The draft lives on rank 0 alone, and only its folder need exist there: rank 0 counts it.
        draft = dataclasses.asdict(model_sizes(read_config(o.draft_model))) if o.draft_model and transport.rank == 0 else None
        return model_dir, sizes, dev, dt, model_fingerprint(model_dir), memory, draft

    def place(sizes, dt, rows, recalled):
        # Ranks on one machine (or one GPU) share its memory.
        available = [r["bytes"] if r["capped"] else r["bytes"] // sum(same_machine(q, r) and q["device"] == r["device"] for q in rows)
                     for r in rows]
        sizes = head_split(sizes, num_stages=transport.world_size, dtype=dtype_name(dt), devices=[r["device"] for r in rows],
                           wanted=o.split_head)
        fit = functools.partial(stage_needs, sizes, dtype=dtype_name(dt), context=o.context, batch=o.batch,
                                available=available, reserve=DEFAULT_RESERVE, quantize=o.quantize)
        # A plan measured on these machines at an earlier run (``placement.remembered``), if it still fits.
        plan, by = (parse_layers(recalled, num_layers=sizes.num_layers), "measured") if recalled else (None, None)
        needs = fit(plan) if plan is not None else None
        if needs is not None and not all(s.fits for s in needs):
            if transport.rank == 0:
                log.warning("the placement measured at an earlier run (%s) does not fit the memory available now; "
                            "placing by memory", recalled)
            plan = None
        if plan is None:
            plan = choose_plan(sizes, num_stages=transport.world_size, layers=o.layers, balance=o.balance,
                               available=available, dtype=dtype_name(dt), context=o.context, batch=o.batch,
                               quantize=o.quantize)
            by = "layers" if o.layers else "memory" if o.balance == "auto" else o.balance
            needs = fit(plan)
        if not all(s.fits for s in needs):
            raise PlanError(
                f"the model does not fit this cluster at {dtype_name(dt)} with a {o.context}-token context:\n"
                + needs_table(needs) + "\nuse a smaller dtype or context, more machines, or `torch_pp plan` to explore"
            )
        cap_memory(dev, available[transport.rank])  # MPS: hold this rank to its share of the Mac's memory
        choose_attention_kernels(dev)  # CUDA: no per-shape cuDNN plans
        return plan, sizes.head_cut, by

    model_dir, sizes, dev, dt, fingerprint, memory, draft = agree(transport, prepare, what="start the pipeline")
    rows = transport.all_gather(memory)
    draft = transport.all_gather(draft)[0]
    if draft is not None:
        sizes = dataclasses.replace(sizes, draft=sizes_from_json(draft))
    # Rank 0's folder decides: it measures and keeps placements, and every rank must place alike.
    where = remembered.folder() if transport.rank == 0 else None
    key = remembered.key(fingerprint=fingerprint, ranks=rows, dtype=dtype_name(dt), quantize=o.quantize,
                         split_head=o.split_head, graphs=o.graphs)
    found = None
    if o.balance == "auto" and not o.layers:
        found = remembered.recall(key, where, num_layers=sizes.num_layers, num_stages=transport.world_size)
    recalled = transport.all_gather(found.spec() if found is not None else None)[0]
    plan, head_cut, placed_by = agree(transport, lambda: place(sizes, dt, rows, recalled), what="place the model")
    agree_on(transport, {
        "torch_pp_version": __version__, "model": f"fingerprint {fingerprint}",
        "plan": plan.spec(), "dtype": dtype_name(dt), "quantize": o.quantize, "frame_bytes": transport.frame_bytes,
        "split_head": head_cut,
    })
    transport.describe(layers=plan.ranges[transport.rank])
    load_start = time.perf_counter()
    (stage, local, draft), load_s = agree(
        transport,
        lambda: ((*_use_slots(load_stage(model_dir, plan=plan, rank=transport.rank, device=dev, dtype=dt,
                                         progress=show, quantize=o.quantize, head_cut=head_cut), o, device=dev, dtype=dt),
                  load_draft(o.draft_model, device=dev, dtype=dt) if transport.rank == 0 else None),
                 time.perf_counter() - load_start),
        what="load the model",
    )
    return model_dir, plan, dev, dt, stage, local, draft, load_s, (key, where) if where is not None else None, placed_by


def _slot_options(config, o: StartOptions, *, device: torch.device, dtype: torch.dtype, required: bool) -> dict | None:
    """``StageRunner.use_slots``'s options for ``config``'s layers, or None: no slots (``required``: graphs=True refuses)."""
    if o.graphs is False:
        return None
    reason = graphs.unsupported(config)
    if reason is not None and o.graphs and required:
        raise OptionsError(f"graphs=True: {reason}; leave graphs unset or False")
    if reason is not None or not (o.graphs or device.type == "cuda"):
        return None
    return dict(max_len=o.context, device=device, dtype=dtype, capture=True,
                room=lambda size: memory_available(device) - size >= DEFAULT_RESERVE)


def _use_slots(stage, o: StartOptions, *, device: torch.device, dtype: torch.dtype):
    """Every rank: preallocated caches and captured decode steps for its own layers, where ``o.graphs``
    asks and the model allows (rank 0: ``rank0.local``; the others: their ``StageRunner``).
    Returns the stage and, on rank 0, its ``LocalLayers`` (or None)."""
    slots = _slot_options(stage.model.config, o, device=device, dtype=dtype, required=True)
    if slots is None:
        return stage, None
    if stage.runner is not None:
        stage.runner.use_slots(**slots)
        return stage, None
    layers = archs.LAYOUT.layer_list(stage.model)
    own = {i: layers[i] for i in range(len(layers)) if i not in stage.remote}
    return stage, LocalLayers(own, stage.model.config, accepts=layer_arguments(layers[0]), slots=slots) if own else None


def _drive(pipe: Pipeline, o: StartOptions, local: LocalLayers | None) -> None:
    """Rank 0: every hook in place (``rank0.install``), with its own layers' slots if it has them
    (the draft's too)."""
    if pipe.draft is not None:
        slots = _slot_options(pipe.draft.config, o, device=pipe.device, dtype=pipe.dtype, required=False)
        pipe.draft_layers = draft_on_slots(pipe.draft, slots) if slots is not None else None
    pipe.rank0 = install(pipe.model, transport=pipe.transport, device=pipe.device, num_stages=pipe.plan.num_stages,
                         remote=pipe.stage.remote, head_cut=pipe.stage.head_cut, local=local,
                         prefill_chunk=o.prefill_chunk, draft=pipe.draft, cutoff=SPECULATION_CUTOFF,
                         on_decode=pipe.decode_windows.append if pipe.plan.num_stages > 1 and pipe.placements else None)
