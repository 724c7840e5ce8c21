"""Rank 0's forward: pipelined (chunked) prefill, and per-layer outputs across stages.

A long prompt flows through the stages in chunks.

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

from .model import outputs
from .devices import min_prefill_chunk
from .devices.turn import DeviceTurn
from .model.stage import RemoteSpan, StageError

def default_chunk(prompt_len: int, stages: int, *, smallest: int = 64) -> int:
    """About four chunks per stage, at least ``smallest`` tokens each (see ``devices.min_prefill_chunk``);
    a prompt shorter than two such chunks goes whole (the returned size covers it)."""
    if prompt_len < 2 * smallest:
        # A second, shorter chunk pays one more message's fixed cost to overlap less than one
        # chunk's compute: on 2x H200 a 1430-token prompt in chunks of 1024 was at best as fast
        # as whole, and on one H200 holding both stages 1.18x slower.
        return prompt_len
    return max(smallest, math.ceil(prompt_len / (4 * stages)))


def install(model, span: RemoteSpan, *, stages: int, local_layers: int, chunk: int | None = None,
            turn: DeviceTurn | None = None, driver=None, device=None) -> None:
    """Wrap rank 0's ``model.forward``: pipelined prefills, and per-layer outputs across stages.

    Long cached forwards (prefills) are cut into chunks. ``output_hidden_states`` returns
    every layer's state, the remote ones sent back by the stages; ``output_attentions`` is
    refused (see ``torch_pp.outputs``). ``model.prefill_chunk`` may be changed later: an int
    sets the chunk size, 0 turns chunking off, None picks ``default_chunk``.

    Args:
        model: Rank 0's model.
        span: Its placeholder span for the remote layers.
        stages: Number of pipeline stages.
        local_layers: Decoder layers on rank 0.
        chunk: The initial ``prefill_chunk``.
        turn: Rank 0's ``devices.turn.DeviceTurn``, held by each call while it does device work.
        driver: The ``runtime.Driver``, told when rank 0's own compute starts and ends (its spans).
        device: Rank 0's device: it sets the smallest chunk worth sending (``devices.min_prefill_chunk``).
    """
    turn = turn or DeviceTurn()
    smallest = min_prefill_chunk(device if device is not None else model.device)
    original = model.forward
    model.prefill_chunk = chunk
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with turn.held():
            if driver is None:
                return _forward(*args, **kwargs)
            driver.mark_busy()
            try:
                return _forward(*args, **kwargs)
            finally:
                driver.mark_idle()

    def _forward(*args, **kwargs):
        if args:  # positional arguments (model(input_ids)) become keywords
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
        outputs.refuse_attentions(model, kwargs)
        selection = outputs.wants(model, kwargs, "hidden_states")
        if selection is not False and selection is not None:
            return _with_hidden_states(original, span, kwargs, selection, local_layers=local_layers,
                                       num_layers=model.config.num_hidden_layers)
        name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        x = kwargs.get(name)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keep = kwargs.get("logits_to_keep", 0)
        size = model.prefill_chunk
        if x is not None and size is None:
            size = default_chunk(x.shape[1], stages, smallest=smallest)
        if (x is None or cache is None or not kwargs.get("use_cache", True) or not size
                or x.shape[1] <= size or not (isinstance(keep, int) and keep >= 1)):
            span.set_stream(keep=keep if isinstance(keep, int) else 0)
            try:
                return original(**kwargs)
            finally:
                span.set_stream()
        return _chunked(original, span, kwargs, name=name, size=size, keep=keep)

    model.forward = forward


def _chunked(original, span: RemoteSpan, kwargs: dict, *, name: str, size: int, keep: int):
    """Run a prefill in chunks of ``size`` tokens; only the last one waits for the stages."""
    x, cache = kwargs[name], kwargs.get("cache", kwargs.get("past_key_values"))
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
        span.set_stream(reply=b == total, keep=keep)
        try:
            out = original(**part)
        finally:
            span.set_stream()
    return out


def _with_hidden_states(original, span: RemoteSpan, kwargs: dict, selection, *, local_layers: int, num_layers: int):
    """One unchunked forward that records every layer's hidden state, on every stage."""
    return_dict = kwargs.pop("return_dict", True)
    span.collect_states(True)
    try:
        out = original(**{**kwargs, "output_hidden_states": True, "return_dict": True})
    finally:
        remote = span.collect_states(False)
    if remote is None:
        raise StageError("output_hidden_states: the remote layers did not run")
    out.hidden_states = outputs.merge_hidden_states(out.hidden_states, remote, local_layers=local_layers,
                                                    num_layers=num_layers, selection=selection)
    return out if return_dict else out.to_tuple()
