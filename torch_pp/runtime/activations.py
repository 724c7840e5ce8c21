"""What travels between stages: the hidden state and every remote layer's arguments.

HF passes each decoder layer the same few tensors (mask, position ids, rotary
cos/sin). They are sent once each and referenced by slot; per-layer argument
dicts that are identical share one template. Which layer gets which template and
what each template holds is the same at every decode step, so it travels as one
JSON string (``args``), made once per structure on the sender and parsed once per
structure on the receiver. Pure functions, no communication.
"""

from __future__ import annotations

import functools
import json
import operator

import torch

_SCALARS = (bool, int, float, str, type(None))


def encode(hidden: torch.Tensor, layer_kwargs: dict[int, dict], *, past_len: int, use_cache: bool) -> tuple[dict, list[torch.Tensor]]:
    """Turn a hidden state and per-layer kwargs into ``(meta, tensors)`` for a message.

    Raises:
        TypeError: for a layer argument that cannot travel (not a tensor, tuple of tensors or scalar).
    """
    tensors: list[torch.Tensor] = [hidden]
    slot_of: dict[int, int] = {}

    def slot(t: torch.Tensor) -> int:
        key = id(t)
        if key not in slot_of:
            slot_of[key] = len(tensors)
            tensors.append(t)
        return slot_of[key]

    def enc(name: str, value) -> tuple:
        if isinstance(value, torch.Tensor):
            return (name, "t", slot(value))
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            return (name, "tt", tuple(slot(v) for v in value))
        if isinstance(value, _SCALARS):
            return (name, "v", type(value), value)  # the type too: True == 1, but they are sent apart
        raise TypeError(f"decoder layer argument {name!r} of type {type(value).__name__} cannot be sent between stages")

    # Layers usually get the very same objects: group them by identity, encode each group once.
    templates: list[tuple] = []
    key_to_template: dict[tuple, int] = {}
    chosen: list[int] = []
    previous, template = None, -1
    for kwargs in layer_kwargs.values():
        # The usual case first, and the cheap test: the very objects the layer before was given.
        if previous is None or not _same(kwargs, previous):
            key = tuple((k, type(v), v) if isinstance(v, _SCALARS) else (k, tuple(map(id, v)) if isinstance(v, tuple) else id(v))
                        for k, v in kwargs.items())
            if key not in key_to_template:
                key_to_template[key] = len(templates)
                templates.append(tuple(enc(k, v) for k, v in sorted(kwargs.items())))
            previous, template = kwargs, key_to_template[key]
        chosen.append(template)
    args = _args_doc(tuple(layer_kwargs), tuple(chosen), tuple(templates))
    return {"past_len": past_len, "use_cache": use_cache, "args": args}, tensors


@functools.lru_cache(maxsize=256)
def _args_doc(layers: tuple[int, ...], chosen: tuple[int, ...], templates: tuple[tuple, ...]) -> str:
    """A step's structure as ``args`` JSON, made once per structure (see ``encode``)."""
    return json.dumps({"layers": list(layers), "chosen": list(chosen),
                       "templates": [[[name, kind, value[-1]] for name, kind, *value in t] for t in templates]},
                      separators=(",", ":"))


def _same(kwargs: dict, other: dict) -> bool:
    """Whether two layers' arguments are the very same objects (C-level checks: this runs per layer)."""
    return kwargs.keys() == other.keys() and all(map(operator.is_, kwargs.values(), other.values()))


@functools.lru_cache(maxsize=64)
def _args(doc: str) -> tuple:
    """A step's structure, parsed once (read only): ``((layer, template index)..., templates)``."""
    parsed = json.loads(doc)
    templates = tuple(tuple((name, kind, tuple(value) if kind == "tt" else value) for name, kind, value in t)
                      for t in parsed["templates"])
    return tuple(zip(parsed["layers"], parsed["chosen"])), templates


def decode(meta: dict, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, dict], int, bool]:
    """Inverse of ``encode``: ``(hidden, layer_kwargs, past_len, use_cache)``, built from ``tensors``
    where they are (a stage places them on its device first: see ``devices.copies.Inbox``)."""
    layers, templates = _args(meta["args"])
    built = [{name: tensors[value] if kind == "t" else tuple(tensors[s] for s in value) if kind == "tt" else value
              for name, kind, value in t} for t in templates]
    return tensors[0], {idx: built[t] for idx, t in layers}, int(meta["past_len"]), bool(meta["use_cache"])
