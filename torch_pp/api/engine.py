"""Requests on the pipeline, concurrently: admission, continuous batching or one ``generate()`` per
request, stop strings, cancellation. No HTTP here (see ``api.app``).

By default requests share decode steps: they join and leave running batches at step boundaries
(``rank0.batch``), each sampled with its own settings. Where a model cannot batch that way
(sliding windows) or the server speculates (one stream's proposals multiply every step's work),
every request runs its own ``generate()`` call in its own thread instead, with its own KV cache
on rank 0 and therefore its own lane on every stage (see ``rank0.lanes``).

Either way a request that arrives while others generate starts at once, up to
``max_concurrent`` of them; up to ``max_queue`` more wait for a slot; past that a request is
refused (``Busy``), never left hanging. A cancelled request (a client gone) stops at its next
decode step, and its row or lane is released.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from ..errors import OptionsError, TorchPPError
from ..options import check_generation_args
from ..rank0.batch import Job, Sampling
from ..rank0.batches import Batches
from ..rank0.workers import POOL


class Busy(TorchPPError, RuntimeError):
    """Every slot and every queue place is taken (HTTP 429)."""


class Lost(TorchPPError, RuntimeError):
    """The pipeline has lost a stage: no request can run any more (HTTP 503)."""


@dataclass(frozen=True)
class Request:
    """One completion request, already tokenized and checked (``Request.checked``).

    Attributes:
        input_ids: The prompt's token ids.
        max_tokens: New tokens at most.
        temperature: 0 for greedy decoding (as OpenAI clients expect), else the sampling temperature.
        top_p: Nucleus sampling mass, or None.
        seed: Seeds sampling (reproducible when the request runs alone), or None.
        stop: Strings that end the completion; they are not part of the returned text.
    """

    input_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def checked(cls, input_ids, *, max_tokens: int | None, default_max_tokens: int, temperature: float | None,
                top_p: float | None, seed: int | None, stop) -> "Request":
        """Build a request, refusing values out of the CLI's ranges (``OptionsError``, a 400)."""
        temperature = 1.0 if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise OptionsError(f"temperature={temperature!r} is out of range: it must be a number in [0, 2]")
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        check_generation_args(max_new_tokens=max_tokens, top_p=top_p,
                              temperature=temperature if temperature > 0 else None)
        if max_tokens < 1:
            raise OptionsError(f"max_tokens={max_tokens} is out of range: it must be at least 1")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise OptionsError("stop must be a non-empty string or a list of at most 4 of them")
        if not input_ids:
            raise OptionsError("the prompt is empty")
        return cls(tuple(input_ids), max_tokens, float(temperature), top_p, seed, stop)


class _Cancelled(StoppingCriteria):
    """Ends generate() at the next step once the request is cancelled."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopTrimmer:
    """Holds back text that may begin a stop string, and cuts the text at the first one."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what can be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._flush()
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text) - hold
        # never hold back more than a stop string's possible start
        while safe < len(self.text) and not any(s.startswith(self.text[safe:]) for s in self.stop):
            safe += 1
        out, self.sent = self.text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return out

    def _flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._flush()


@dataclass(eq=False)
class Generation:
    """One running request: text pieces come from ``pieces()``; the figures once it is done."""

    request: Request
    cancel: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None
    finish_reason: str = "stop"

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


class Engine:
    """Runs requests on rank 0's pipelined model.

    Args:
        model: The pipeline's HF model (``pipe.model``).
        tokenizer: Its tokenizer.
        max_concurrent: Requests generating at once (each in its own lane).
        max_queue: Requests waiting for a slot; beyond them, ``Busy``.
        lost: Returns the liveness verdict once a stage is lost (None while all are alive).
        speculate: generate() arguments for speculative decoding (``{"prompt_lookup_num_tokens": K}``;
            ``{}`` for the pipeline's draft model), given to a request that starts while no other
            runs; a request that starts beside others decodes plainly (``assistant_model=None``):
            speculation multiplies the work of every step, which pays only where one stream has the
            machines to itself. None: never. Only without ``batches``.
        batches: The running batches requests join (``rank0.batch.Batches``); None: one
            ``generate()`` per request.
    """

    def __init__(self, model, tokenizer, *, max_concurrent: int, max_queue: int, lost: Callable[[], str | None],
                 speculate: dict | None = None, batches: Batches | None = None) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise OptionsError(f"max_concurrent must be at least 1 and max_queue at least 0, got {max_concurrent}, {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.lost = lost
        if batches is not None and speculate is not None:
            raise OptionsError("a batching server does not speculate: give speculate or batches, not both")
        self.speculate = speculate
        self.batches = batches
        self.speculated = 0  # requests that ran with speculation
        self._slots = threading.Semaphore(max_concurrent)
        self._lock = threading.Lock()
        self._active: set[Generation] = set()  # admitted, not yet ended
        self.running = 0  # requests generating
        self.waiting = 0  # requests admitted, waiting for a slot

    def check_alive(self) -> None:
        """Raises ``Lost`` with the verdict once a stage is lost."""
        verdict = self.lost()
        if verdict:
            raise Lost(verdict)

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        """Run ``generation`` and yield its text as it comes (stop strings cut off).

        Cancelling the iteration (a client gone) cancels the request: it stops at its next step.

        Raises:
            Busy: when every slot and queue place is taken (before anything runs).
            Lost: when a stage is lost (before or while it runs).
        """
        self.check_alive()
        with self._lock:
            if self.running + self.waiting >= self.max_concurrent + self.max_queue:
                raise Busy(f"{self.running} requests are running and {self.waiting} waiting (--max-concurrent "
                           f"{self.max_concurrent}, --max-queue {self.max_queue}); try again shortly")
            self.waiting += 1
            self._active.add(generation)
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        # A kept thread, not a new one: a new thread has no cuDNN attention plans (see ``rank0.workers``).
        done = POOL.submit(self._run, generation, streamer, self._batched if self.batches is not None else self._alone)
        trimmer = StopTrimmer(generation.request.stop)
        try:
            async for piece in streamer:
                text = trimmer.feed(piece)
                if text:
                    yield text
                if trimmer.stopped:
                    generation.cancel.set()  # the stop string came through: no need for more tokens
            rest = trimmer.finish()
            if rest:
                yield rest
            await asyncio.wrap_future(done)  # the figures are set as the call ends
            if generation.error is not None:
                raise generation.error
            if trimmer.stopped:
                generation.finish_reason = "stop"
        finally:
            generation.cancel.set()  # no-op once done; a client gone stops the request at its next step

    def _run(self, generation: Generation, streamer: AsyncTextIteratorStreamer, how: Callable) -> None:
        """Take a slot (waiting for one), run the request ``how`` says (it returns the finish reason), end
        its stream either way."""
        acquired = False
        try:
            self._slots.acquire()
            acquired = True
            with self._lock:
                self.waiting -= 1
                self.running += 1
                alone = self.running == 1
            if generation.cancel.is_set():
                streamer.end()
                return
            self.check_alive()
            generation.finish_reason = how(generation, streamer, alone)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine
            generation.error = Lost(self.lost()) if self.lost() else exc
            streamer.end()  # wake the coroutine, which raises the error
        finally:
            with self._lock:
                if acquired:
                    self.running -= 1
                else:
                    self.waiting -= 1
                self._active.discard(generation)
            if acquired:
                self._slots.release()

    def _batched(self, generation: Generation, streamer: AsyncTextIteratorStreamer, alone: bool) -> str:
        """The request as a row of a running batch (``rank0.batch``); returns its finish reason once it
        has left."""
        request = generation.request
        sampled = request.temperature > 0  # the same settings as the request's own generate() call below
        sampling = Sampling(max_new_tokens=request.max_tokens, do_sample=sampled,
                            temperature=request.temperature if sampled else None,
                            top_p=(request.top_p or 1.0) if sampled else None, top_k=0 if sampled else None,
                            seed=request.seed)
        stopping = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(request.stop))]) if request.stop else None
        streamer.put(torch.tensor([request.input_ids]))  # the prompt, which the streamer skips
        job = Job(request.input_ids, sampling, on_token=lambda t: streamer.put(torch.tensor([t])), stopping=stopping,
                  cancel=generation.cancel, output_ids=generation.output_ids)
        try:
            return self.batches.submit(job).result()
        finally:
            streamer.end()

    def _alone(self, generation: Generation, streamer: AsyncTextIteratorStreamer, alone: bool) -> str:
        """The request as its own generate() call, in its own lane (speculating where it runs alone);
        returns its finish reason."""
        request = generation.request
        speculation = {"assistant_model": None}  # beside others: plain decoding, the draft off
        if alone and self.speculate is not None:
            speculation = dict(self.speculate)
            self.speculated += 1
        ids = torch.tensor([request.input_ids], device=self.model.device)
        sampling = {"do_sample": False}
        if request.temperature > 0:
            sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p or 1.0, "top_k": 0}
            if request.seed is not None:
                torch.manual_seed(request.seed)
        stop = {"stop_strings": list(request.stop), "tokenizer": self.tokenizer} if request.stop else {}
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens, streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(generation.cancel)]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling, **stop, **speculation)
        generation.output_ids = out[0, ids.shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        ended = bool(generation.output_ids) and generation.output_ids[-1] in (eos if isinstance(eos, list) else [eos])
        return "length" if len(generation.output_ids) >= request.max_tokens and not ended else "stop"

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Cancel every request and wait until none runs (before the pipeline closes); True if none is left."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                for generation in self._active:
                    generation.cancel.set()
                if not self._active:
                    return True
            time.sleep(0.02)
        return False
