"""Rank 0's own decoder layers over slots: their decode steps replayed as CUDA graphs too.

Rank 0 runs the model's own Hugging Face forward, and with it the decoder layers it owns. On
an accelerator those layers' eager launches are most of a decode step, and a second lane could
only wait for them (figures: ``bench/RESULTS.md``, "rank 0's own layers").

Each local layer's ``forward`` is wrapped in place by ``rank0.install`` (the modules, their
parameter names and hooks stay as they are). The first local layer of a forward finds the lane
of the KV cache object HF passes (each cache object its own lane, as for the remote layers) and
that lane's ``graphs.Slot`` in a ``StageRunner`` of rank 0's layers, and keeps them in the
forward's ``Step``; a decode step (or a speculative verification step) is then replayed from the slot's captured step at the first
layer, and every local layer returns a copy of its own output from that replay (so hooks that
record hidden states see each layer's real output). Other forwards (prefills, steps that cannot
be captured) run each layer eagerly on the slot's keys and values. HF's own cache keeps a
one-wide stand-in in the layers whose lengths it reads, as it does for the remote layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import StageError
from ..model import graphs, rows
from ..model.stage import CACHE_KWARGS, StageRunner
from .lanes import CacheLanes
from .placeholders import cache_of, named_arguments, positional_names, sentinel_layers, stand_in
from .step import OwnLayers, take_step


class LocalLayers:
    """On rank 0: its decoder layers' keys and values in slots, their decode steps captured.

    Args:
        layers: Global layer index -> decoder layer, rank 0's layers (contiguous, from layer 0).
        config: The model config.
        accepts: The keyword arguments the layers consume (see ``model.stage.layer_arguments``); the
            others never reach a captured step.
        slots: ``StageRunner.use_slots``'s options for rank 0's own slots.
    """

    def __init__(self, layers: dict[int, nn.Module], config, *, accepts: frozenset[str] | None, slots: dict) -> None:
        self.indices = range(min(layers), max(layers) + 1)
        self.order = {idx: pos for pos, idx in enumerate(layers)}
        self.forwards = {idx: layer.forward for idx, layer in layers.items()}  # each layer's own, unwrapped
        self.runner = StageRunner(self.forwards, config)
        self.runner.use_slots(**slots)
        self.accepts = accepts
        self.positional = {idx: positional_names(layer) for idx, layer in layers.items()}
        self._lanes = CacheLanes()  # each cache object its own lane, as for the remote layers

    def figures(self) -> dict:
        """How rank 0's own decode steps ran (see ``StageRunner.figures``)."""
        return self.runner.figures()

    def move_rows(self, target: DynamicCache, parts: list[rows.Part]) -> None:
        """Move rows between the lanes of rank 0's cache objects (``Part.source`` a cache object), as the
        stages do (``StageRunner.move_rows``)."""
        self.runner.move_rows(self._lanes.lane_of(target),
                              [rows.Part(self._lanes.lane_of(p.source), p.rows, p.shift) for p in parts])

    def forward(self, idx: int, hidden: torch.Tensor, *args, **kwargs):
        """Layer ``idx``'s forward in place of its own (``rank0.install`` wraps it)."""
        step = take_step(kwargs, idx)
        kwargs = named_arguments(idx, self.positional[idx], args, kwargs)
        cache = cache_of(kwargs)
        if not isinstance(cache, DynamicCache) or kwargs.get("use_cache", True) is False:
            return self.forwards[idx](hidden, **kwargs)  # no cache to keep: the layer as it is
        if idx == self.indices.start:
            step.own = self._begin(cache, hidden, kwargs)
        elif step.own is None:
            raise StageError(f"decoder layer {idx} ran without layer {self.indices.start} before it")
        own = step.own
        if own.replayed:
            if any(kwargs.get(k) is not v for k, v in own.shared.items()):
                raise StageError(f"decoder layer {idx} was given other arguments than layer {self.indices.start}: "
                                 "its decode step cannot be replayed; start with graphs=False")
            out = own.kv.outs[self.order[idx]].clone()
        else:
            layer_kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            out = self.forwards[idx](hidden, **layer_kwargs, **{self.runner.cache_kw: own.cache})
        if idx == self.indices.stop - 1:
            self.runner.advance(own.lane, hidden.shape[1])
            step.own = None
        return out

    def _begin(self, cache: DynamicCache, hidden: torch.Tensor, kwargs: dict) -> OwnLayers:
        """At the first local layer: the lane, its slot, and a replay of the whole step if it can be one."""
        for lane in self._lanes.take_freed():  # caches gone since the last forward (the caller holds rank 0's device turn)
            self.runner.free(lane)
        past_len = cache.get_seq_length(self.indices.start)
        for idx in sentinel_layers(cache, self.indices):
            stand_in(cache, idx, hidden)
        lane = self._lanes.lane_of(cache)
        try:
            # Rank 0's own cache is the one HF crops (assisted generation): shorter than its slot means cropped.
            kv = self.runner.lane_cache(lane, hidden, past_len, rewind=True)
        except StageError as exc:  # refused before anything is sent: say where
            raise StageError(f"rank 0's own layers {self.indices.start}:{self.indices.stop}: {exc}") from None
        if not isinstance(kv, graphs.Slot):
            own = OwnLayers(lane=lane, kv=kv, cache=kv)
        else:
            shared = {k: v for k, v in kwargs.items()
                      if k not in CACHE_KWARGS and (self.accepts is None or k in self.accepts)}
            replayed = graphs.replayable(hidden, past_len) and kv.replay(hidden, shared, past_len)
            kv.kv.captured, kv.kv.length = False, past_len  # eager layers write from past_len on
            own = OwnLayers(lane=lane, kv=kv, cache=kv.kv, shared=shared, replayed=replayed)
        self.runner.count(hidden, kv, replayed=own.replayed)
        return own
