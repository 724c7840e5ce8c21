"""Rank 0's placeholders for the decoder layers other ranks own.

Rank 0 runs the model's own Hugging Face forward (embedding, masks, positions, rotary
embeddings, final norm, LM head), so everything the installed transformers version computes
before the layers is computed exactly once, there. Each layer another rank owns is replaced by
a weightless ``RemoteLayer``: it records the arguments HF passes it in the forward's ``Step``,
and the last one hands the hidden state and the step to the ring (``RemoteSpan.runner``, given
at construction), which runs them on the other stages and returns the final hidden state.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import StageError
from ..model.stage import CACHE_KWARGS
from .lanes import CacheLanes
from .step import Step, take_step

# runner(hidden, step, head=...) -> the final hidden state [B, S or keep, H] (see ``rank0.ring.Ring.run_remote``)
Runner = Callable[..., torch.Tensor]


def positional_names(layer: nn.Module) -> tuple[str, ...]:
    """A decoder layer's positional parameter names after the hidden state (some families pass
    the mask and the like positionally)."""
    params = [n for n, p in inspect.signature(layer.forward).parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple(params[1:])


def named_arguments(layer_idx: int, positional: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A layer call's arguments after the hidden state, all by name (they travel by name)."""
    if len(args) > len(positional):
        raise StageError(f"decoder layer {layer_idx} was given {len(args)} positional arguments after the "
                         f"hidden state; it takes {len(positional)}")
    kwargs.update(zip(positional, args))
    return kwargs


def cache_of(kwargs: dict):
    """The KV cache object a layer was given, under whichever keyword this transformers uses."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def records_past(cache) -> bool:
    """Whether a cache records its past for crops (transformers switches it on for assisted generation
    and for MPS's deferred stop check: sliding-window layers then keep more than their window)."""
    return any(getattr(layer, "record_past", False) for layer in getattr(cache, "layers", ()))


def mark_cropped(cache: DynamicCache) -> None:
    """Mark ``cache`` as one transformers will crop after every verification (assisted generation, and
    a draft's own cache): its crop then passes over the layers that never had an entry. Those are
    the layers whose keys and values live elsewhere (on other stages, or in rank 0's slots), and
    transformers 5.17's crop fails on them; a stand-in grown in each of them every step instead cost
    an 8B model's assisted step about 3 ms on a GPU (``bench/RESULTS.md``)."""
    cache.crop = functools.partial(_crop_held, cache)


def _crop_held(cache: DynamicCache, tokens_to_remove: int) -> None:
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True):
            layer.crop(tokens_to_remove)


def sentinel_layers(cache: DynamicCache, elsewhere: range) -> set[int]:
    """Layers among ``elsewhere`` (whose keys and values rank 0's cache does not hold) whose cache
    lengths HF reads: the span's first layer (our own bookkeeping) and the first full-attention
    and first sliding-window layer (mask sizing); and while the cache records its past (assisted
    generation, which crops it), every sliding-window layer: transformers' crop of such a layer
    fails on one that never had an entry."""
    found = {elsewhere.start}
    is_sliding = list(getattr(cache, "is_sliding", []))
    for kind in (False, True):
        if kind in is_sliding and is_sliding.index(kind) in elsewhere:
            found.add(is_sliding.index(kind))
    if records_past(cache):
        found.update(i for i in elsewhere if i < len(is_sliding) and is_sliding[i])
    return found


def stand_in(cache: DynamicCache, layer_idx: int, hidden: torch.Tensor) -> None:
    """Grow layer ``layer_idx`` of rank 0's ``cache`` by ``hidden``'s positions with a one-wide stand-in
    (zero-wide would count as empty), so the lengths HF reads from it stay right."""
    batch, q_len = hidden.shape[0], hidden.shape[1]
    filler = hidden.new_zeros(batch, 1, q_len, 1)
    cache.update(filler, filler, layer_idx)


class RemoteSpan:
    """On rank 0: collects the arguments of the layers other ranks own, then runs them remotely.

    Every KV cache object on rank 0 gets its own lane (its own caches on the stages), so
    concurrent ``generate()`` calls from several threads never share stage caches, and a
    call that continues from a returned ``past_key_values`` finds its lane again. Once a
    cache object is garbage-collected, ``take_freed`` gives its lane to the ring to
    release on the stages.

    Args:
        layer_indices: The contiguous global layer indices owned by other ranks.
        runner: Runs a step's remote layers (``rank0.ring.Ring.run_remote``).
        accepts: The keyword arguments the decoder layers consume (see ``model.stage.layer_arguments``);
            None sends every argument.
        head: A ``rank0.head.SplitHead`` where the LM head is split with the last stage.
        lanes: The lanes of rank 0's cache objects (the ring tells the stages which are gone).
    """

    def __init__(self, layer_indices: range, *, runner: Runner, accepts: frozenset[str] | None = None,
                 head=None, lanes: CacheLanes | None = None) -> None:
        self.layer_indices = layer_indices
        self.runner = runner
        self.accepts = accepts
        self.head = head
        self._lanes = lanes or CacheLanes()
        self.take_freed = self._lanes.take_freed
        self.resized = self._lanes.resized

    def lane_of(self, cache) -> int:
        """The lane of a rank-0 KV cache object (a new one on first sight)."""
        return self._lanes.lane_of(cache)

    def visit(self, layer_idx: int, hidden: torch.Tensor, kwargs: dict, step: Step) -> torch.Tensor:
        """Layer ``layer_idx``'s turn in ``step``: record its arguments; at the last layer, run them all."""
        cache = cache_of(kwargs)
        # A layer given a cache updates it; not every family also passes use_cache (Gemma 3 does not).
        use_cache = cache is not None and kwargs.get("use_cache", True) is not False
        if layer_idx == self.layer_indices.start:
            step.pending, step.use_cache = {}, use_cache
            step.past_len = cache.get_seq_length(layer_idx) if use_cache else 0
            step.lane = self.lane_of(cache) if use_cache else 0
            step.sentinels = sentinel_layers(cache, self.layer_indices) if use_cache else set()
            if use_cache:
                step.rewind = self._lanes.moved_back(step.lane, step.past_len, hidden.shape[1])
                step.record = records_past(cache)
        if use_cache:
            if not isinstance(cache, DynamicCache):
                raise StageError(
                    f"torch_pp supports only a dynamic KV cache, got {type(cache).__name__}; "
                    "leave cache_implementation unset"
                )
            if layer_idx in step.sentinels:
                stand_in(cache, layer_idx, hidden)  # the real keys and values live on the owning stage
        step.pending[layer_idx] = {k: v for k, v in kwargs.items()
                                   if k not in CACHE_KWARGS and (self.accepts is None or k in self.accepts)}
        if layer_idx != self.layer_indices.stop - 1:
            return hidden
        split = self.head is not None and step.reply and not step.collect and self.head.wants(hidden.shape[0], step.keep)
        out = self.runner(hidden, step, head=self.head if split else None)
        if not step.collect:
            return out
        out, states = out
        step.states = [hidden, *states]
        return out


class RemoteLayer(nn.Module):
    """Placeholder, on rank 0, for decoder layer ``layer_idx`` owned by another rank. Holds no weights."""

    def __init__(self, layer_idx: int, span: RemoteSpan, attention_type: str | None = None,
                 positional: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.span = span
        self.positional = positional  # the replaced layer's parameter names after the hidden state
        if attention_type is not None:
            self.attention_type = attention_type

    @classmethod
    def replacing(cls, layer: nn.Module, layer_idx: int, span: RemoteSpan) -> "RemoteLayer":
        """The placeholder for ``layer`` (a meta-device module), taking its arguments the way ``layer`` does."""
        return cls(layer_idx, span, getattr(layer, "attention_type", None), positional_names(layer))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = take_step(kwargs, self.layer_idx)
        return self.span.visit(self.layer_idx, hidden_states, named_arguments(self.layer_idx, self.positional, args, kwargs), step)
