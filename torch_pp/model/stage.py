"""A pipeline stage's math: running its own decoder layers, and standing in for the others.

Rank 0 runs the model's own Hugging Face forward (embedding, masks, positions,
rotary embeddings, final norm, LM head), so everything the installed transformers
version computes before the layers is computed exactly once, there. The decoder
layers that other ranks own are replaced on rank 0 by ``RemoteLayer`` placeholders:
they record the arguments HF passes to each layer, and the last one hands the
hidden state plus those arguments to a ``runner`` that the runtime plugs in.

Other ranks run ``StageRunner``: their layers, with their own KV cache, on the
arguments shipped from rank 0. Nothing here imports torch.distributed.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import threading
import typing
import weakref
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache
from ..errors import StageError
from . import graphs

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")

# runner(hidden, layer_kwargs, past_len=..., use_cache=...) -> final hidden state
Runner = Callable[..., torch.Tensor]


def cache_keyword(layer: nn.Module) -> str:
    """The keyword this transformers version's decoder layer takes its cache under.

    transformers renamed ``past_key_values`` to ``cache`` (5.24); both are supported.
    """
    params = inspect.signature(getattr(layer, "forward", layer)).parameters  # a module or its bound forward
    return "cache" if "cache" in params else "past_key_values"


def layer_arguments(layer: nn.Module) -> frozenset[str] | None:
    """The keyword arguments a decoder layer's forward can consume, or None if it takes any.

    transformers threads every keyword of ``generate()``/``forward()`` through to the layers
    (a ``tokenizer`` for ``stop_strings``, say). Only the layer's named parameters and the
    keys of its typed ``**kwargs`` (``Unpack[TransformersKwargs]``) can matter to it, so
    only those travel; anything else would at best be ignored on the other stage.
    """
    names: set[str] = set()
    for name, param in inspect.signature(layer.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            typed = typing.get_args(param.annotation)  # Unpack[SomeTypedDict] -> (SomeTypedDict,)
            if not (typed and hasattr(typed[0], "__optional_keys__")):
                return None  # untyped **kwargs: it may read anything
            names |= typed[0].__optional_keys__ | typed[0].__required_keys__
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(name)
    return frozenset(names - {"hidden_states", *CACHE_KWARGS})


class CacheLanes:
    """Lane ids of rank-0 KV cache objects: a new one for each object on first sight; once an
    object is garbage-collected, ``take_freed`` hands its id back (once), from any thread.

    Deliberately no finalizer and no ``WeakKeyDictionary``: their callbacks are Python code that
    runs wherever the cache dies, which is the end of every ``generate()``; a Ctrl-C landing
    there is printed as "Exception ignored" and dropped by CPython. Plain weak references
    without callbacks run nothing, and dead ones are found when the lanes are next used.
    """

    def __init__(self) -> None:
        self._lanes: dict[int, tuple[weakref.ref, int]] = {}  # id(cache) -> (weak ref, lane)
        self._orphans: list[int] = []  # lanes whose id() a new cache took before they were handed back
        self._ids = itertools.count(1)  # lane 0: forwards without a cache
        self._lock = threading.Lock()

    def lane_of(self, cache) -> int:
        with self._lock:
            entry = self._lanes.get(id(cache))
            if entry is not None and entry[0]() is cache:
                return entry[1]
            if entry is not None:  # the id of a dead cache, reused
                self._orphans.append(entry[1])
            lane = next(self._ids)
            self._lanes[id(cache)] = (weakref.ref(cache), lane)
        return lane

    def take_freed(self) -> list[int]:
        """The lanes whose cache is gone since the last call."""
        with self._lock:
            dead = [key for key, (ref, _) in self._lanes.items() if ref() is None]
            freed, self._orphans = [*self._orphans, *(self._lanes.pop(key)[1] for key in dead)], []
        return freed


def positional_names(layer: nn.Module) -> tuple[str, ...]:
    """A decoder layer's positional parameter names after the hidden state (some families pass
    the mask and the like positionally)."""
    params = [n for n, p in inspect.signature(layer.forward).parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return tuple(params[1:])


class RemoteSpan:
    """On rank 0: collects the arguments of the layers other ranks own, then runs them remotely.

    Every KV cache object on rank 0 gets its own lane (its own caches on the stages), so
    concurrent ``generate()`` calls from several threads never share stage caches, and a
    call that continues from a returned ``past_key_values`` finds its lane again. Once a
    cache object is garbage-collected, ``take_freed`` gives its lane to the driver to
    release on the stages.

    Args:
        layer_indices: The contiguous global layer indices owned by other ranks.
        accepts: The keyword arguments the decoder layers consume (see ``layer_arguments``);
            None sends every argument.
    """

    def __init__(self, layer_indices: range, *, accepts: frozenset[str] | None = None) -> None:
        self.layer_indices = layer_indices
        self.accepts = accepts
        self.runner: Runner | None = None
        self.head = None  # a ``model.head.SplitHead`` where the LM head is split with the last stage
        self._lanes = CacheLanes()
        self.take_freed = self._lanes.take_freed
        # Per thread: several threads may run forwards at once.
        self._local = threading.local()

    def _state(self):
        st = self._local
        if not hasattr(st, "pending"):
            st.pending, st.past_len, st.sentinels, st.lane = {}, 0, set(), 0
            st.reply, st.keep, st.collect, st.states = True, 0, False, None
        return st

    def set_stream(self, *, reply: bool = True, keep: int = 0) -> None:
        """For this thread's next forwards: ``reply`` False while a pipelined prefill streams its
        non-final chunks; ``keep``: the last positions whose hidden state rank 0 needs back (0: all)."""
        st = self._state()
        st.reply, st.keep = reply, keep

    def collect_states(self, on: bool) -> list[torch.Tensor] | None:
        """Turn on (or off) returning every remote layer's output for this thread's forwards.

        Returns:
            When turning off: ``[input of the span, output of each remote layer...]`` from the
            last forward, or None if no forward ran meanwhile.
        """
        st = self._state()
        st.collect, states, st.states = on, st.states, None
        return states

    def lane_of(self, cache) -> int:
        """The lane of a rank-0 KV cache object (a new one on first sight)."""
        return self._lanes.lane_of(cache)

    def visit(self, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        # A layer given a cache updates it; not every family also passes use_cache (Gemma 3 does not).
        use_cache = cache is not None and kwargs.get("use_cache", True) is not False
        st = self._state()
        if layer_idx == self.layer_indices.start:
            st.pending = {}
            st.past_len = cache.get_seq_length(layer_idx) if use_cache else 0
            st.sentinels = sentinel_layers(cache, self.layer_indices) if use_cache else set()
            st.lane = self.lane_of(cache) if use_cache else 0
        if use_cache:
            if not isinstance(cache, DynamicCache):
                raise StageError(
                    f"torch_pp supports only a dynamic KV cache, got {type(cache).__name__}; "
                    "leave cache_implementation unset"
                )
            if layer_idx in st.sentinels:
                # The real keys and values live on the owning stage.
                stand_in(cache, layer_idx, hidden)
        st.pending[layer_idx] = {k: v for k, v in kwargs.items()
                                 if k not in CACHE_KWARGS and (self.accepts is None or k in self.accepts)}
        if layer_idx != self.layer_indices.stop - 1:
            return hidden
        if self.runner is None:
            raise StageError("the pipeline is closed: start it again before running the model")
        pending, st.pending = st.pending, {}
        split = (self.head is not None and st.reply and not st.collect and self.head.wants(hidden.shape[0], st.keep))
        out = self.runner(hidden, pending, past_len=st.past_len, use_cache=use_cache, reply=st.reply,
                          keep=0 if st.collect else st.keep, lane=st.lane, collect=st.collect,
                          head=self.head if split else None)
        if not st.collect:
            return out
        out, states = out
        st.states = [hidden, *states]
        return out


def sentinel_layers(cache: DynamicCache, elsewhere: range) -> set[int]:
    """Layers among ``elsewhere`` (whose keys and values rank 0's cache does not hold) whose cache
    lengths HF reads: the span's first layer (our own bookkeeping) and the first full-attention
    and first sliding-window layer (mask sizing)."""
    found = {elsewhere.start}
    is_sliding = list(getattr(cache, "is_sliding", []))
    for kind in (False, True):
        if kind in is_sliding and is_sliding.index(kind) in elsewhere:
            found.add(is_sliding.index(kind))
    return found


def stand_in(cache: DynamicCache, layer_idx: int, hidden: torch.Tensor) -> None:
    """Grow layer ``layer_idx`` of rank 0's ``cache`` by ``hidden``'s positions with a one-wide stand-in
    (zero-wide would count as empty), so the lengths HF reads from it stay right."""
    batch, q_len = hidden.shape[0], hidden.shape[1]
    filler = hidden.new_zeros(batch, 1, q_len, 1)
    cache.update(filler, filler, layer_idx)


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
        """The placeholder for ``layer``, taking its arguments the way ``layer`` does."""
        return cls(layer_idx, span, getattr(layer, "attention_type", None), positional_names(layer))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > len(self.positional):
            raise StageError(f"decoder layer {self.layer_idx} was given {len(args)} positional arguments after the "
                             f"hidden state; it takes {len(self.positional)}")
        # Some families pass the mask and the like positionally: they travel by name.
        kwargs.update(zip(self.positional, args))
        return self.span.visit(self.layer_idx, hidden_states, kwargs)


class StageRunner:
    """On ranks > 0: runs this stage's decoder layers with this stage's KV cache.

    Args:
        layers: Global layer index -> the HF decoder layer module, for the layers this stage owns.
        config: The model config (sizes the KV cache, including sliding-window layers).
    """

    def __init__(self, layers: dict[int, nn.Module], config) -> None:
        self.layers = layers
        self.config = config
        self.cache_kw = cache_keyword(next(iter(layers.values())))
        self.caches: dict[int, tuple[DynamicCache | graphs.Slot, int]] = {}  # lane -> (KV cache, tokens in it)
        self.slots: dict[int, list[graphs.Slot]] | None = None  # batch size -> free slots; None: no slots
        self._slot_len = 0
        self._slot_args: dict = {}
        self._room: Callable[[int], bool] = lambda n: True
        self._slot_dtype = torch.float32
        self._steps = collections.Counter()  # decode steps by how they ran
        self.tail = None  # on the last stage, its rows of a split LM head (``model.head.TailHead``)

    def use_slots(self, *, max_len: int, device: torch.device, dtype: torch.dtype, capture: bool,
                  room: Callable[[int], bool]) -> None:
        """Give each lane a preallocated ``graphs.Slot`` of ``max_len`` positions, its decode steps
        captured as CUDA graphs where ``capture``.

        Args:
            max_len: Positions per sequence (the context the plan was sized for); a lane that
                outgrows it continues in a dynamic cache.
            device, dtype: Where and in what the cache lives.
            capture: Capture decode steps (CUDA only); False runs the same steps eagerly.
            room: ``room(bytes)`` says whether a new slot of that many bytes may be allocated; a
                lane that finds no room runs with a dynamic cache.
        """
        self.slots, self._slot_len, self._room = {}, max_len, room
        graphs.install(self.config)  # captured or not: the same attention and masks everywhere
        self._slot_args = {"cache_kw": self.cache_kw, "max_len": max_len, "device": device, "capture": capture,
                           "pool": torch.cuda.graph_pool_handle() if capture else None}
        self._slot_dtype = dtype

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, layer_kwargs: dict[int, dict], *, past_len: int, use_cache: bool,
                lane: int = 0, collect: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every owned layer on ``hidden`` [B, S, H] with ``lane``'s cache; returns [B, S, H].

        With ``collect``, returns ``(hidden, [each owned layer's output, [B, S, H]...])``.
        """
        cache = self.lane_cache(lane, hidden, past_len) if use_cache else None
        if isinstance(cache, graphs.Slot):
            shared = next(iter(layer_kwargs.values()))
            out = None
            if hidden.shape[1] == 1 and not collect and all(kw is shared for kw in layer_kwargs.values()):
                out = cache.step(hidden, shared, past_len)
            self.count(hidden, cache, replayed=out is not None)
            hidden, states = (out, []) if out is not None else cache.run(
                lambda kv: self._layers(hidden, layer_kwargs, kv, collect=collect), past_len)
        else:
            self.count(hidden, cache, replayed=False)
            hidden, states = self._layers(hidden, layer_kwargs, cache, collect=collect)
        if use_cache:
            self.advance(lane, hidden.shape[1])
        return (hidden, states) if collect else hidden

    def lane_cache(self, lane: int, hidden: torch.Tensor, past_len: int) -> "DynamicCache | graphs.Slot":
        """The KV cache ``lane`` runs ``hidden`` [B, S, H] in from position ``past_len``: a new one
        at 0, checked to hold exactly ``past_len`` tokens, moved out of a slot it would outgrow."""
        if past_len == 0:
            self.free(lane)
            self.caches[lane] = (self._new_cache(hidden.shape[0], hidden.shape[1]), 0)
        cache, seen = self.caches.get(lane, (None, -1))
        if cache is None or seen != past_len:
            raise StageError(
                f"KV cache of lane {lane} out of step: this stage holds {max(seen, 0)} tokens, rank 0 expects {past_len}. "
                "Beam search, assisted decoding, cache cropping and copied caches are not supported"
            )
        if isinstance(cache, graphs.Slot) and past_len + hidden.shape[1] > self._slot_len:
            cache = self._spill(lane, cache, past_len)
        return cache

    def advance(self, lane: int, tokens: int) -> None:
        """``lane``'s cache took ``tokens`` more positions."""
        cache, seen = self.caches[lane]
        self.caches[lane] = (cache, seen + tokens)

    def count(self, hidden: torch.Tensor, cache, *, replayed: bool) -> None:
        """Count a decode step (one position) by how it ran (see ``figures``)."""
        if hidden.shape[1] == 1:
            self._steps["graph_steps" if replayed else "slot_steps" if isinstance(cache, graphs.Slot) else "eager_steps"] += 1

    def figures(self) -> dict:
        """How this stage's decode steps ran: ``graphs`` (on, eager slots, or off), slots made, and
        decode steps replayed from captured pieces, run eagerly in a slot, or run eagerly in a
        dynamic cache; ``kv_lanes``, the sequences whose KV cache it holds now; and on a last stage
        with a split LM head, its ``head_rows`` and ``head_steps`` (see ``model.head``)."""
        head = self.tail.figures() if self.tail is not None else {}
        if self.slots is None:
            return {"graphs": "off", "kv_lanes": len(self.caches), **head}
        made = sum(len(free) for free in self.slots.values()) + sum(isinstance(c, graphs.Slot) for c, _ in self.caches.values())
        return {"graphs": "on" if self._slot_args["capture"] else "eager", "kv_lanes": len(self.caches), "slots": made,
                "graph_steps": self._steps["graph_steps"], "slot_steps": self._steps["slot_steps"],
                "eager_steps": self._steps["eager_steps"], **head}

    def _layers(self, hidden: torch.Tensor, layer_kwargs: dict[int, dict], cache, *, collect: bool):
        states = []
        for idx, layer in self.layers.items():
            kwargs = dict(layer_kwargs[idx])
            kwargs[self.cache_kw] = cache
            hidden = layer(hidden, **kwargs)
            if isinstance(hidden, tuple):  # older layer classes return (hidden, ...)
                hidden = hidden[0]
            if collect:
                states.append(hidden)
        return hidden, states

    def _new_cache(self, batch: int, prompt_len: int):
        """A free slot for ``batch`` sequences, a new one if there is room, else a dynamic cache."""
        if self.slots is None or prompt_len > self._slot_len:
            return DynamicCache(config=self.config)
        free = self.slots.setdefault(batch, [])
        if free:
            return free.pop()
        size = graphs.slot_bytes(self.config, layers=len(self.layers), batch=batch, max_len=self._slot_len,
                                 dtype=self._slot_dtype)
        if not self._room(size):
            return DynamicCache(config=self.config)
        return graphs.Slot(self.layers, batch=batch, **self._slot_args)

    def _spill(self, lane: int, slot: "graphs.Slot", past_len: int) -> DynamicCache:
        """Move a lane that outgrows its slot into a dynamic cache, and free the slot."""
        cache = slot.kv.to_dynamic(past_len, self.config)
        self.caches[lane] = (cache, past_len)
        self.slots[slot.kv.batch].append(slot)
        return cache

    def free(self, lane: int) -> None:
        """Drop one lane's KV cache (its sequence is finished); its slot serves later lanes."""
        cache, _ = self.caches.pop(lane, (None, 0))
        if isinstance(cache, graphs.Slot):
            self.slots[cache.kv.batch].append(cache)

    def reset(self) -> None:
        """Drop every KV cache (a closed session)."""
        for lane in list(self.caches):
            self.free(lane)
