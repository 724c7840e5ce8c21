"""A pipeline stage's math: its own decoder layers, run with its own KV caches.

Ranks other than 0 run ``StageRunner``: their layers, one KV cache per lane, on the
arguments shipped from rank 0 (rank 0's own layers use one too, for their slots: see
``rank0.local``). The arguments come by name, as the layer's forward takes them
(``layer_arguments``), and the cache under this transformers version's keyword
(``cache_keyword``). Nothing here imports torch.distributed or knows the wire.
"""

from __future__ import annotations

import collections
import inspect
import typing
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache
from ..devices import fuses
from ..errors import StageError
from . import fusion, graphs, rows

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


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
            capture: Record decode steps (as CUDA graphs on CUDA, called as recorded elsewhere);
                False runs them eagerly with transformers' own attention.
            room: ``room(bytes)`` says whether a new slot of that many bytes may be allocated; a
                lane that finds no room runs with a dynamic cache.
        """
        self.slots, self._slot_len, self._room = {}, max_len, room
        graphs.install(self.config)  # captured or not: the same attention and masks everywhere
        self._slot_args = {"cache_kw": self.cache_kw, "max_len": max_len, "device": device, "capture": capture,
                           "pool": torch.cuda.graph_pool_handle() if capture and device.type == "cuda" else None,
                           "fuse": capture and fuses(device)}
        self._slot_dtype = dtype

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, layer_kwargs: dict[int, dict], *, past_len: int, use_cache: bool,
                lane: int = 0, collect: bool = False, rewind: bool = False,
                record: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every owned layer on ``hidden`` [B, S, H] with ``lane``'s cache; returns [B, S, H].

        With ``collect``, returns ``(hidden, [each owned layer's output, [B, S, H]...])``. ``rewind``
        and ``record``: see ``lane_cache``.
        """
        cache = self.lane_cache(lane, hidden, past_len, rewind=rewind, record=record) if use_cache else None
        if isinstance(cache, graphs.Slot):
            shared = next(iter(layer_kwargs.values()))
            out = None
            if graphs.replayable(hidden, past_len) and not collect and all(kw is shared for kw in layer_kwargs.values()):
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

    def lane_cache(self, lane: int, hidden: torch.Tensor, past_len: int, *, rewind: bool = False,
                   record: bool = False) -> "DynamicCache | graphs.Slot":
        """The KV cache ``lane`` runs ``hidden`` [B, S, H] in from position ``past_len``: a new one
        at 0, checked to hold exactly ``past_len`` tokens, moved out of a slot it would outgrow.

        Args:
            rewind: Rank 0 cropped this lane's cache (transformers' assisted generation drops the
                rejected part of a proposal, MPS generation its one step ahead): a lane holding more
                than ``past_len`` tokens moves back to it. Without it, any mismatch raises.
            record: Rank 0's cache records its past (``activate_past_recording``: sliding-window
                layers keep what a crop may need again); this lane's does the same from now on.
                It is cut back to the window only by a rewind's crop, never on its own: rank 0 may
                crop further back than its last step (the attention and masks are the same either
                way: a recording layer hands each step only the window's states).
        """
        if past_len == 0:
            self.free(lane)
            self.caches[lane] = (self._new_cache(hidden.shape[0], hidden.shape[1]), 0)
        cache, seen = self.caches.get(lane, (None, -1))
        if cache is not None and rewind and seen > past_len:
            self._crop(cache, seen - past_len)
            self._steps["rewinds"] += 1
            seen = past_len
            self.caches[lane] = (cache, seen)
        if cache is None or seen != past_len:
            raise StageError(
                f"KV cache of lane {lane} out of step: this stage holds {max(seen, 0)} tokens, rank 0 expects {past_len}. "
                "Beam search and copied caches are not supported"
            )
        if isinstance(cache, DynamicCache):
            _set_recording(cache, record)
        if isinstance(cache, graphs.Slot) and past_len + hidden.shape[1] > self._slot_len:
            cache = self._spill(lane, cache, past_len)
        return cache

    @torch.inference_mode()
    def move_rows(self, lane: int, parts: list[rows.Part]) -> None:
        """Make ``lane``'s cache hold the parts' rows (each ``Part.source`` a lane), as rank 0 moved its
        own (``model.rows``); the other source lanes are freed. With slots, the rows land in a slot of
        the new batch size (its steps captured as any slot's), else in a dynamic cache.

        Raises:
            StageError: for a source lane this stage does not hold, or parts that do not line up.
        """
        held = {}
        for part in parts:
            if part.source not in held:
                held[part.source] = self.caches.get(part.source, (None, -1))
                if held[part.source][0] is None:
                    raise StageError(f"row move into lane {lane}: this stage holds no KV cache of lane {part.source}")
        try:
            length = rows.moved_length(parts, [held[p.source][1] for p in parts])
        except ValueError as exc:
            raise StageError(f"row move into lane {lane}: {exc}") from None
        target = self._new_cache(sum(len(p.rows) for p in parts), length)
        for idx in self.layers:
            kv = [_layer_kv(held[p.source][0], idx, held[p.source][1]) for p in parts]
            if all(x is None for x in kv):
                continue
            if any(x is None for x in kv):
                raise StageError(f"row move into lane {lane}: layer {idx} is held by only some of its sources")
            keys, values = rows.joined([k for k, _ in kv], parts), rows.joined([v for _, v in kv], parts)
            if isinstance(target, graphs.Slot):
                target.kv.fill(idx, keys, values)
            else:
                target.update(keys, values, idx)
        for source in held:
            self.free(source)  # a source slot serves later lanes
        self.caches[lane] = (target, length)

    def _crop(self, cache, tokens: int) -> None:
        """Drop a lane's last ``tokens`` positions in this stage's layers (the cache's others never had
        an entry, and transformers' crop of an empty sliding-window layer fails); a slot's positions
        are overwritten by its next step."""
        if isinstance(cache, DynamicCache):
            for idx in self.layers:
                if idx < len(cache.layers):
                    cache.layers[idx].crop(-tokens)

    def advance(self, lane: int, tokens: int) -> None:
        """``lane``'s cache took ``tokens`` more positions."""
        cache, seen = self.caches[lane]
        self.caches[lane] = (cache, seen + tokens)

    def count(self, hidden: torch.Tensor, cache, *, replayed: bool) -> None:
        """Count a decode step (one position) or a verification step (a few, after a replayed or
        slotted past) by how it ran (see ``figures``)."""
        slot = isinstance(cache, graphs.Slot)
        how = "graph" if replayed and cache.graphed else "slot" if slot else "eager"
        if hidden.shape[1] == 1:
            self._steps[f"{how}_steps"] += 1
        elif slot and (replayed or hidden.shape[1] <= graphs.MAX_STEP_TOKENS):
            self._steps[f"{how}_verify_steps"] += 1

    def figures(self) -> dict:
        """How this stage's decode steps ran: ``graphs`` (on, eager slots, or off), slots made, step
        shapes recorded (``captures``, one per shape and bucket: see ``graphs``), whether their norms
        and MLPs run fused (``fused``: see ``model.fusion``), and
        decode steps replayed as CUDA graphs, run in a slot (as recorded, off CUDA, or eagerly), or run eagerly in a
        dynamic cache; speculative verification steps replayed or run eagerly in a slot; ``rewinds``,
        the times a lane moved back to rank 0's cropped length; ``kv_lanes``, the sequences whose KV cache it holds now; and on a last stage
        with a split LM head, its ``head_rows`` and ``head_steps`` (see ``model.head``)."""
        head = self.tail.figures() if self.tail is not None else {}
        if self.slots is None:
            return {"graphs": "off", "kv_lanes": len(self.caches), "rewinds": self._steps["rewinds"], **head}
        made = [slot for free in self.slots.values() for slot in free] + \
            [c for c, _ in self.caches.values() if isinstance(c, graphs.Slot)]
        graphed = self._slot_args["capture"] and self._slot_args["device"].type == "cuda"
        return {"graphs": "on" if graphed else "eager", "kv_lanes": len(self.caches), "slots": len(made),
                "captures": sum(len(slot.captures) for slot in made),
                "fused": any(slot.fuse and slot.captured for slot in made) and fusion.usable(),
                "rewinds": self._steps["rewinds"],
                "graph_steps": self._steps["graph_steps"], "slot_steps": self._steps["slot_steps"],
                "eager_steps": self._steps["eager_steps"], "graph_verify_steps": self._steps["graph_verify_steps"],
                "slot_verify_steps": self._steps["slot_verify_steps"], **head}

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
        fits = self._room(size)
        if not fits and any(self.slots.values()):
            # Free slots of other batch sizes (continuous batching makes many) give way to this one.
            self.slots = {b: [] for b in self.slots}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fits = self._room(size)
        if not fits:
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


def _layer_kv(cache, idx: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Layer ``idx``'s keys and values in a lane's cache (a slot's first ``length`` positions), or None."""
    if isinstance(cache, graphs.Slot):
        return cache.kv.layer(idx, length)
    if idx < len(cache.layers) and cache.layers[idx].get_seq_length() > 0:
        return cache.layers[idx].keys, cache.layers[idx].values
    return None


def _set_recording(cache: DynamicCache, record: bool) -> None:
    """Record the past in a lane's sliding-window layers exactly while rank 0's cache does (transformers
    switches it on before an assisted call's prefill, and off where it hands a cache back)."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "record_past") and layer.record_past != record:
            if record:
                layer.activate_past_recording()
            else:
                layer.record_past = False
