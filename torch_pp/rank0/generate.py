"""Rank 0's generate hook: HF ``generate()`` guarded, with lanes and the device turn passed on.

Rank 0's model is the checkpoint's own transformers ``*ForCausalLM`` class, so
``generate()`` is transformers' own (logits processors, sampling, streamers,
stopping criteria, generation_config), assisted generation included (prompt lookup or a
draft model: see ``rank0.speculation``). Modes that reorder the KV cache (beam search, ...) are
refused, before anything is sent.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import UnsupportedGenerationError
from ..options import check_generation_args
from ..perf import StepTimer
from ..trace import now
from .lanes import split_generate
from .turn import DeviceTurn

try:  # the enum moved between transformers releases
    from transformers.generation.configuration_utils import GenerationMode
except ImportError:  # pragma: no cover
    from transformers.generation import GenerationMode

SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.ASSISTED_GENERATION)


def check_generation_mode(model, kwargs: dict) -> GenerationMode:
    """The call's generation mode; UnsupportedGenerationError for modes other than greedy search,
    sampling and assisted generation (greedy or sampled)."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in SUPPORTED_MODES:
        raise UnsupportedGenerationError(
            f"torch_pp runs greedy search, sampling and assisted generation; {mode.value.replace('_', ' ')} needs to "
            "reorder the KV cache that lives on the other stages. Use num_beams=1"
        )
    return mode


class DecodeClock:
    """When each thread of one generate() call had its tokens, for the call's decode window.

    transformers checks the stopping criteria once per new token, the first right after the
    prompt's prefill, so from a thread's first check to its last it ran only decode steps. With
    lanes, the window is the stretch in which every lane was decoding.
    """

    def __init__(self) -> None:
        self._marks: dict[int, list] = {}  # thread id -> [first, last, decode steps]

    def tick(self) -> None:
        t = now()
        mark = self._marks.get(threading.get_ident())
        if mark is None:
            self._marks[threading.get_ident()] = [t, t, 0]
        else:
            mark[1], mark[2] = t, mark[2] + 1

    def window(self) -> tuple[float, float, int] | None:
        """``(start, end, decode steps)`` of the stretch every thread spent decoding, or None."""
        marks = list(self._marks.values())
        if not marks:
            return None
        start, end = max(m[0] for m in marks), min(m[1] for m in marks)
        return (start, end, min(m[2] for m in marks)) if end > start else None


class _PassTurn(StoppingCriteria):
    """Never stops a sequence: after each token it lets other threads waiting for the device go
    first (and ticks the call's ``DecodeClock``)."""

    def __init__(self, turn: DeviceTurn, clock: DecodeClock | None = None) -> None:
        self.turn = turn
        self.clock = clock

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.clock is not None:
            self.clock.tick()
        self.turn.pass_on()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_hook(model, *, ring=None, timer: StepTimer | None = None, turn: DeviceTurn, on_decode=None, draft=None,
                  drafts: bool = False):
    """The ``generate`` that replaces rank 0's ``model.generate`` (``rank0.install`` puts it in place):
    it refuses what the pipeline cannot run, clearly, and accepts ``lanes=``.

    Refused before anything is sent: modes that reorder or crop the KV cache, and sampling or
    length arguments out of range (see ``options.check_generation_args``).

    Args:
        model: Rank 0's model.
        ring: The pipeline's ``rank0.ring.Ring`` (None with a single stage). With one, ``generate(...,
            lanes=L)`` splits the batch into L concurrently running sub-batches (default 1), and after
            each call the stages drop the caches of finished lanes.
        timer: Rank 0's step timer (counts the threads inside generate(), for its idle spans).
        turn: Rank 0's device turn: each call holds it while it does device work.
        on_decode: Called with each finished call's decode window, ``(start, end, steps)`` (see
            ``DecodeClock``), on the thread that made the call (not for assisted calls, whose steps
            are verifications of several tokens).
        draft: The pipeline's draft model (``StartOptions.draft_model``), if any: a call of one
            sequence that asks for no other speculation (``assistant_model``,
            ``prompt_lookup_num_tokens``) is assisted by it; ``assistant_model=None`` turns it off.
        drafts: ``model`` is itself a draft: transformers crops the cache of each of its calls, as an
            assisted call's.
    """
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        count = kwargs.pop("lanes", None)
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if draft is not None and _may_draft(kwargs):
            kwargs["assistant_model"] = draft
        assisted = check_generation_mode(model, kwargs) == GenerationMode.ASSISTED_GENERATION
        if assisted or drafts:
            _mark_cropped(model, kwargs)
        config = kwargs.get("generation_config") or model.generation_config
        check_generation_args(**{k: kwargs.get(k, getattr(config, k, None))
                                 for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                           "max_new_tokens", "min_new_tokens")})
        # After each token, other callers waiting for the device go first (see ``DeviceTurn``).
        clock = DecodeClock() if on_decode is not None and not assisted else None
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or ()), _PassTurn(turn, clock)])
        with turn.held():
            out = _generate(original, args, kwargs, 1 if assisted else count)  # assisted: one sequence
        if ring is not None:  # not after a failure: its own error must be what the caller sees
            ring.release_freed()
        window = clock.window() if clock is not None else None
        if window is not None:
            on_decode(window)
        return out

    def _generate(original, args, kwargs, count):
        ids = kwargs.get("input_ids")
        if ring is None or ids is None or args:
            return original(*args, **kwargs)
        # One lane unless asked: splitting a batch did not pay where measured (``bench/RESULTS.md``,
        # "lanes"). A given cache is one lane: it cannot be split.
        if count is None or any(kwargs.get(k) is not None for k in ("past_key_values", "cache")):
            count = 1
        count = max(1, min(int(count), ids.shape[0]))
        if count == 1:
            with timer.calling():
                return original(**kwargs)
        config = kwargs.get("generation_config") or model.generation_config
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        if pad is None:
            eos = kwargs.get("eos_token_id", config.eos_token_id)
            pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
        def in_lane(**sub):  # each lane's thread takes turns at the device like any other caller
            with turn.held():
                return original(**sub)

        with turn.given_up(), timer.calling(count):  # this thread only waits for its lanes
            return split_generate(in_lane, lanes=count, pad_with=pad, **kwargs)

    return generate


def _may_draft(kwargs: dict) -> bool:
    """Whether a call may be assisted by the pipeline's draft: one sequence, and no other speculation
    asked for (an explicit ``assistant_model=None`` keeps it plain)."""
    if "assistant_model" in kwargs:
        if kwargs["assistant_model"] is None:
            del kwargs["assistant_model"]  # transformers' own default
        return False
    ids = kwargs.get("input_ids")
    return not kwargs.get("prompt_lookup_num_tokens") and (ids is None or ids.shape[0] == 1)


def _mark_cropped(model, kwargs: dict) -> None:
    """An assisted call's cache (a new one where none is given), marked: HF crops it after every
    verification (see ``placeholders.mark_cropped``)."""
    from transformers import DynamicCache

    from .placeholders import mark_cropped

    name = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kwargs[name] = DynamicCache(config=model.config)
    mark_cropped(kwargs[name])
