"""Pipelined (chunked) prefill: a long prompt flows through the stages in chunks.

Rank 0 runs its layers on chunk i+1 while the next stage works on chunk i: non-final
chunks are sent without waiting for an answer (the last stage keeps them in its cache and
sends nothing back), and only the final chunk's last positions return. Logits equal the
unchunked prefill's (up to floating-point summation order), because every chunk sees the
masks and positions transformers computes for it against the cache so far.
"""

from __future__ import annotations

import functools
import inspect
import math

from .stage import RemoteSpan

MIN_CHUNK = 64


def default_chunk(prompt_len: int, stages: int) -> int:
    """About four chunks per stage, at least MIN_CHUNK tokens each."""
    return max(MIN_CHUNK, math.ceil(prompt_len / (4 * stages)))


def install(model, span: RemoteSpan, *, stages: int, chunk: int | None = None) -> None:
    """Wrap ``model.forward`` so that long cached forwards (prefills) are pipelined.

    ``model.prefill_chunk`` may be changed later: an int sets the chunk size, 0 turns chunking
    off, None picks ``default_chunk``.
    """
    original = model.forward
    model.prefill_chunk = chunk
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args:  # positional arguments (model(input_ids)) become keywords
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
            args = ()
        name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        x = kwargs.get(name)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keep = kwargs.get("logits_to_keep", 0)
        size = model.prefill_chunk
        if x is not None and size is None:
            size = default_chunk(x.shape[1], stages)
        if (args or x is None or cache is None or not kwargs.get("use_cache", True) or not size
                or x.shape[1] <= size or not (isinstance(keep, int) and keep >= 1)):
            span.keep = keep if isinstance(keep, int) else 0
            try:
                return original(*args, **kwargs)
            finally:
                span.keep = 0
        total, past = x.shape[1], cache.get_seq_length()
        mask, pos, cpos = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache_position")
        out = None
        for a in range(0, total, size):
            b = min(a + size, total)
            part = dict(kwargs)
            part[name] = x[:, a:b]
            if mask is not None and mask.dim() == 2:
                part["attention_mask"] = mask[:, : past + b]
            if pos is not None:
                part["position_ids"] = pos[..., a:b]
            if cpos is not None:
                part["cache_position"] = cpos[a:b]
            span.reply, span.keep = b == total, keep
            try:
                out = original(**part)
            finally:
                span.reply, span.keep = True, 0
        return out

    model.forward = forward
