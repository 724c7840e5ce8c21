"""What travels between stages: the hidden state and every remote layer's arguments.

HF passes each decoder layer the same few tensors (mask, position ids, rotary
cos/sin). They are sent once each and referenced by slot; per-layer argument
dicts that are identical share one template. Pure functions, no communication.
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

    def enc(name: str, value):
        if isinstance(value, torch.Tensor):
            return {"t": slot(value)}
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            return {"tt": [slot(v) for v in value]}
        if isinstance(value, _SCALARS):
            return {"v": value}
        raise TypeError(f"decoder layer argument {name!r} of type {type(value).__name__} cannot be sent between stages")

    # Layers usually get the very same objects: group them by identity, encode each group once.
    templates: list[str] = []
    key_to_template: dict[tuple, int] = {}
    layer_template: dict[str, int] = {}
    previous, template = None, -1
    for idx, kwargs in layer_kwargs.items():
        # The usual case first, and the cheap test: the very objects the layer before was given.
        if previous is None or not _same(kwargs, previous):
            key = tuple((k, type(v), v) if isinstance(v, _SCALARS) else (k, tuple(map(id, v)) if isinstance(v, tuple) else id(v))
                        for k, v in kwargs.items())
            if key not in key_to_template:
                key_to_template[key] = len(templates)
                templates.append(json.dumps({k: enc(k, v) for k, v in sorted(kwargs.items())}, separators=(",", ":")))
            previous, template = kwargs, key_to_template[key]
        layer_template[str(idx)] = template
    meta = {"past_len": past_len, "use_cache": use_cache, "templates": templates, "layers": layer_template}
    return meta, tensors


def _same(kwargs: dict, other: dict) -> bool:
    """Whether two layers' arguments are the very same objects (C-level checks: this runs per layer)."""
    return kwargs.keys() == other.keys() and all(map(operator.is_, kwargs.values(), other.values()))


@functools.lru_cache(maxsize=64)
def _template(doc: str) -> dict:
    """A parsed template (read only): every decode step sends the same few."""
    return json.loads(doc)


def decode(meta: dict, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, dict[int, dict], int, bool]:
    """Inverse of ``encode``: ``(hidden, layer_kwargs, past_len, use_cache)``, built from ``tensors``
    where they are (a stage places them on its device first: see ``devices.copies.Inbox``)."""
    def dec(value: dict):
        if "t" in value:
            return tensors[value["t"]]
        if "tt" in value:
            return tuple(tensors[s] for s in value["tt"])
        return value["v"]

    built = [{k: dec(v) for k, v in _template(doc).items()} for doc in meta["templates"]]
    layer_kwargs = {int(idx): built[ti] for idx, ti in meta["layers"].items()}
    return tensors[0], layer_kwargs, int(meta["past_len"]), bool(meta["use_cache"])
