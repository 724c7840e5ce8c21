"""Every hook rank 0 puts into its Hugging Face model, in one place.

Rank 0's model is the checkpoint's own transformers class, loaded with only rank 0's weights
(``model.loading``); the layers other ranks own are left there as empty slots. ``install``
makes it run the pipeline, touching the model in exactly these places:

1. each empty slot becomes a ``RemoteLayer`` placeholder, whose span runs the remote layers
   through the ``Ring`` (the runner is given to the span when it is made);
2. with slots (captured decode steps), each of rank 0's own layers' ``forward`` becomes
   ``LocalLayers.forward``;
3. with a split LM head, ``lm_head.forward`` becomes ``SplitHead.forward``;
4. with remote or slotted layers (what reads a ``Step``), ``model.forward`` becomes the forward
   hook (``rank0.forward``): one ``Step`` per forward, passed down to the layers, and pipelined
   prefill;
5. ``model.generate`` becomes the generate hook (``rank0.generate``): refusals, lanes, the
   device turn passed on after each token, the pipeline's draft model;
6. ``model._get_candidate_generator`` (transformers' factory of assisted generation's proposers)
   wraps each proposer it makes to count its proposals (``rank0.speculation``).

Modules, parameter names and HF hooks stay as they are: only forwards are replaced.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import archs
from ..errors import StageError
from ..model import rows
from ..model.stage import layer_arguments
from ..perf import StepTimer
from .forward import forward_hook
from .generate import generate_hook
from .head import SplitHead
from .lanes import CacheLanes
from .local import LocalLayers
from .placeholders import RemoteLayer, RemoteSpan
from .ring import Ring
from .speculation import Cutoff, Speculation, counted_candidates
from .turn import DeviceTurn


@dataclass(eq=False)
class Rank0:
    """What rank 0 runs beside its model (``install`` makes it; the ``Pipeline`` holds it).

    Attributes:
        turn: One thread at a time does device work (``rank0.turn.DeviceTurn``).
        timer: Rank 0's step timer (``perf.StepTimer``).
        ring: The ring to the other stages (None with one stage).
        span: The placeholders' span for the remote layers (None with one stage).
        local: Rank 0's own layers over slots (None without slots).
        head: Rank 0's half of a split LM head (None when whole).
        speculation: What assisted generate() calls proposed and accepted.
    """

    turn: DeviceTurn
    timer: StepTimer
    ring: Ring | None = None
    span: RemoteSpan | None = None
    local: LocalLayers | None = None
    head: SplitHead | None = None
    speculation: Speculation | None = None

    def move_rows(self, target, parts: list[rows.Part]) -> int:
        """Make rank-0 KV cache ``target`` hold ``parts``' rows (``Part.source`` rank-0 cache objects,
        ``target`` possibly among them), and every stage's lane of it the same (``model.rows``);
        returns the positions it holds. The caller holds the device turn; the sources other than
        ``target`` are not to be used again.

        Raises:
            StageError: for parts that do not line up, or a sliding-window layer.
        """
        try:
            length = rows.moved_length(parts, [p.source.get_seq_length() for p in parts])
        except ValueError as exc:
            raise StageError(f"rank 0: {exc}") from None
        if self.ring is not None:  # the stages first: a lost stage fails before rank 0 changes anything
            lane = self.span.lane_of(target)
            self.ring.move_rows(lane, [rows.Part(self.span.lane_of(p.source), p.rows, p.shift) for p in parts])
            self.span.resized(lane, length)
        if self.local is not None:
            self.local.move_rows(target, parts)
        rows.move_rows(target, parts)  # rank 0's own layers, or the stand-ins of the others'
        return length

    def figures(self) -> dict:
        """How rank 0's own decode steps ran (``graphs`` alone where off), its split head's figures and
        the speculation counts (``rank0.speculation``)."""
        own = self.local.figures() if self.local is not None else {"graphs": "off"}
        return {**own, **(self.head.figures() if self.head is not None else {}),
                **(self.speculation.figures() if self.speculation is not None else {})}


def install(model: nn.Module, *, transport, device: torch.device, num_stages: int, remote: dict[int, nn.Module],
            head_cut: int = 0, local: LocalLayers | None = None, prefill_chunk: int | None = None,
            on_decode: Callable | None = None, draft: nn.Module | None = None, cutoff: Cutoff | None = None,
            drafts: bool = False) -> Rank0:
    """Make rank 0's ``model`` run the pipeline (see the module's docstring for what it replaces).

    Args:
        model: Rank 0's HF model, as ``model.loading.load_stage`` left it.
        transport: The ring's transport (a ``net.link.Link`` with the liveness monitor).
        device: Rank 0's device.
        num_stages: Pipeline stages.
        remote: Global layer index -> the (meta-device) layer another rank owns, whose slot in
            the layer list is empty.
        head_cut: Split the LM head at this row (0: whole): rank 0 multiplies the rows before it.
        local: Rank 0's own layers over slots, if any.
        prefill_chunk: The initial ``model.prefill_chunk`` (see ``rank0.forward``).
        on_decode: Called with each finished generate() call's decode window.
        draft: The pipeline's draft model on rank 0, assisting one-sequence calls by default.
        cutoff: When an assisted call stops proposing (``rank0.speculation.Cutoff``; None: never).
        drafts: ``model`` is the pipeline's draft, run in one process: transformers crops its caches.

    Returns:
        The parts rank 0 runs beside the model.
    """
    rank0 = Rank0(turn=DeviceTurn(), timer=StepTimer(device), local=local)
    layers = archs.LAYOUT.layer_list(model)
    if head_cut:
        rank0.head = SplitHead.checked(getattr(model, archs.LAYOUT.head), getattr(model, archs.LAYOUT.base).norm,
                                       cut=head_cut)
    if rank0.head is not None:
        rank0.head.head.forward = rank0.head.forward
    if num_stages > 1:
        lanes = CacheLanes()
        rank0.ring = Ring(transport, device=device, timer=rank0.timer, turn=rank0.turn, freed=lanes.take_freed)
        indices = range(min(remote), max(remote) + 1)
        rank0.span = RemoteSpan(indices, runner=rank0.ring.run_remote, accepts=layer_arguments(remote[indices.start]),
                                head=rank0.head, lanes=lanes)
        for i in indices:
            layers[i] = RemoteLayer.replacing(remote[i], i, rank0.span)
        monitor = getattr(transport, "monitor", None)
        if monitor is not None and not monitor.exit_on_loss:
            monitor.on_lost = rank0.ring.stage_lost
    if local is not None:
        for idx, own in local.forwards.items():
            own.__self__.forward = functools.partial(local.forward, idx)
    model.prefill_chunk = prefill_chunk
    if rank0.span is not None or local is not None:  # one plain process: nothing reads a step
        model.forward = forward_hook(model, span=rank0.span, timer=rank0.timer if rank0.ring else None, turn=rank0.turn,
                                     stages=num_stages, local_layers=len(layers) - len(remote), device=device,
                                     head=rank0.head)
    rank0.speculation = Speculation()
    if hasattr(model, "_get_candidate_generator"):
        model._get_candidate_generator = counted_candidates(model, rank0.speculation, cutoff)
    model.generate = generate_hook(model, ring=rank0.ring, timer=rank0.timer, turn=rank0.turn, on_decode=on_decode,
                                   draft=draft, drafts=drafts)
    return rank0
