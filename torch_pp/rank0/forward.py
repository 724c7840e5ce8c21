"""Rank 0's forward hook: one ``Step`` per forward, pipelined (chunked) prefill, per-layer outputs.

Every forward of rank 0's model makes a ``rank0.step.Step`` and passes it to the model's own
forward as an argument (``step.KEYWORD``), which transformers hands on to every decoder layer.

A long prompt flows through the stages in chunks. Rank 0 runs its layers on chunk i+1 while
the next stage works on chunk i: non-final chunks are sent without waiting for an answer (the
last stage keeps them in its cache and sends nothing back), and only the final chunk's last
positions return. Logits equal the unchunked prefill's (up to floating-point summation order),
because every chunk sees the masks and positions transformers computes for it against the
cache so far.
"""

from __future__ import annotations

import functools
import inspect
import math

from ..devices import min_prefill_chunk
from ..errors import StageError
from ..model import outputs
from ..perf import StepTimer
from .placeholders import RemoteSpan
from .step import KEYWORD, Step
from .turn import DeviceTurn


def default_chunk(prompt_len: int, stages: int, *, smallest: int = 64) -> int:
    """About four chunks per stage, at least ``smallest`` tokens each (see ``devices.min_prefill_chunk``);
    a prompt shorter than two such chunks goes whole (the returned size covers it): a second,
    shorter chunk pays one more message's fixed cost to overlap less than one chunk's compute."""
    if prompt_len < 2 * smallest:
        return prompt_len
    return max(smallest, math.ceil(prompt_len / (4 * stages)))


def forward_hook(model, *, span: RemoteSpan | None, timer: StepTimer | None, turn: DeviceTurn, stages: int,
                 local_layers: int, device, head=None):
    """The forward that replaces rank 0's ``model.forward`` (``rank0.install`` puts it in place).

    Long cached forwards (prefills) are cut into chunks (with remote layers). ``output_hidden_states``
    returns every layer's state, the remote ones sent back by the stages; ``output_attentions`` is
    refused (see ``model.outputs``). ``model.prefill_chunk`` may be changed later: an int sets the
    chunk size, 0 turns chunking off, None picks ``default_chunk``.

    Args:
        model: Rank 0's model.
        span: Its placeholder span for the remote layers (None with one stage).
        timer: Rank 0's step timer, told when each forward's compute starts and ends.
        turn: Rank 0's device turn, held by each call while it does device work.
        stages: Number of pipeline stages.
        local_layers: Decoder layers on rank 0.
        device: Rank 0's device: it sets the smallest chunk worth sending (``devices.min_prefill_chunk``).
        head: Rank 0's ``rank0.head.SplitHead``, told when each step's forward is over.
    """
    smallest = min_prefill_chunk(device)
    original = model.forward
    signature = inspect.signature(original)

    def run(kwargs: dict, step: Step):
        if timer is not None:
            timer.begin(step)
        try:
            return original(**kwargs, **{KEYWORD: step})
        finally:
            if timer is not None:
                timer.end(step)
            if head is not None:
                head.settle(step)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with turn.held():
            if args:  # positional arguments (model(input_ids)) become keywords
                bound = signature.bind_partial(*args, **kwargs)
                kwargs = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
            outputs.refuse_attentions(model, kwargs)
            selection = outputs.wants(model, kwargs, "hidden_states")
            if span is not None and selection is not False and selection is not None:
                return _with_hidden_states(run, kwargs, selection, local_layers=local_layers,
                                           num_layers=model.config.num_hidden_layers)
            name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
            x = kwargs.get(name)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            keep = kwargs.get("logits_to_keep", 0)
            size = model.prefill_chunk
            if x is not None and size is None:
                size = default_chunk(x.shape[1], stages, smallest=smallest)
            if (span is None or x is None or cache is None or not kwargs.get("use_cache", True) or not size
                    or x.shape[1] <= size or not (isinstance(keep, int) and keep >= 1)):
                return run(kwargs, Step(keep=keep if isinstance(keep, int) else 0))
            return _chunked(run, kwargs, name=name, size=size, keep=keep)

    return forward


def _chunked(run, kwargs: dict, *, name: str, size: int, keep: int):
    """Run a prefill in chunks of ``size`` tokens; only the last one waits for the stages."""
    x, cache = kwargs[name], kwargs.get("cache", kwargs.get("past_key_values"))
    total, past = x.shape[1], cache.get_seq_length()
    mask, pos, cpos = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache_position")
    # The last chunk holds at least the ``keep`` positions HF asks logits for (a speculative
    # verification keeps every proposed token's): the stages return only the last chunk's.
    starts = [a for a in range(0, total, size) if a <= total - keep] or [0]
    ends = [*starts[1:], total]
    out = None
    for a, b in zip(starts, ends):
        part = dict(kwargs)
        part[name] = x[:, a:b]
        if mask is not None and mask.dim() == 2:
            part["attention_mask"] = mask[:, : past + b]
        if pos is not None:
            part["position_ids"] = pos[..., a:b]
        if cpos is not None:
            part["cache_position"] = cpos[a:b]
        out = run(part, Step(reply=b == total, keep=keep))
    return out


def _with_hidden_states(run, kwargs: dict, selection, *, local_layers: int, num_layers: int):
    """One unchunked forward that records every layer's hidden state, on every stage."""
    return_dict = kwargs.pop("return_dict", True)
    step = Step(collect=True)
    out = run({**kwargs, "output_hidden_states": True, "return_dict": True}, step)
    if step.states is None:
        raise StageError("output_hidden_states: the remote layers did not run")
    out.hidden_states = outputs.merge_hidden_states(out.hidden_states, step.states, local_layers=local_layers,
                                                    num_layers=num_layers, selection=selection)
    return out if return_dict else out.to_tuple()
