"""Continuous batching on rank 0: requests join and leave one running batch at step boundaries.

A ``Batcher`` keeps one KV cache for its batch (one lane on every stage) and, at each step
boundary:

1. prefills waiting requests in a cache of their own (pipelined as any prefill is): the short
   prompts that arrived together as one left-padded batch, a long prompt one piece per boundary
   (``PREFILL_PIECE`` tokens), so the running rows' decode never waits for a whole long prefill;
2. samples a prefilled request's first token and moves it into the batch: rows are left-padded
   so that their last positions line up, as a batched ``generate()`` pads them, with the
   attention mask hiding the padding and positions kept per row (``model.rows``; rank 0 and
   every stage apply the same move, one ROWS message ordered with the steps);
3. runs one decode step for every row and samples each row with its own request's settings,
   through transformers' own logits processors (``generate()``'s, from the model's generation
   config and the request's), each seeded row with a generator of its own;
4. lets finished or cancelled rows leave at once, trimming columns that are padding in every row.

Several batchers (``rank0.batches.Batches``) may run at once, each in its own thread, so that
on a 2-stage pipeline both stages work: one batch's step computes while the other's travels.
Rank 0's device turn keeps their device work apart. Only full-attention models batch this way (a
sliding window's cache is a ring buffer whose columns cannot shift): ``refusal`` says why not.
"""

from __future__ import annotations

import collections
import copy
import inspect
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

from ..errors import OptionsError
from ..options import check_generation_args
from ..model import rows
from .turn import DeviceTurn

log = logging.getLogger("torch_pp")

#: Prompt tokens prefilled per step boundary while other rows decode: a long prompt then delays
#: each decode step by one such piece, not by its whole prefill.
PREFILL_PIECE = 512


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (``generate()``'s names and meanings).

    Attributes:
        max_new_tokens: New tokens at most.
        do_sample: Sample (else greedy).
        temperature, top_p, top_k: Sampling's warpers (None: the model's generation config).
        seed: Seeds this request's own generator (its draws do not depend on the other rows).
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens={self.max_new_tokens!r} is out of range: it must be at least 1")
        check_generation_args(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k)


@dataclass(eq=False)
class Job:
    """One request given to a batcher.

    Attributes:
        input_ids: The prompt's token ids.
        sampling: How to decode it.
        on_token: Called with each new token id as it is sampled (from the batcher's thread).
        stopping: Transformers stopping criteria (e.g. ``StopStringCriteria``), asked after each
            token with the request's tokens so far: any True ends it (``"stop"``).
        cancel: Set to end the request at the next step boundary.
        output_ids: The new tokens so far.
        done: Resolves to the finish reason (``"stop"`` or ``"length"``) or the error.
    """

    input_ids: tuple[int, ...]
    sampling: Sampling
    on_token: Callable[[int], None] | None = None
    stopping: StoppingCriteriaList | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    done: Future = field(default_factory=Future)


@dataclass(eq=False)
class _Joining:
    """A request being prefilled in its own cache (a long prompt's made at its first piece; short
    prompts prefilled together get one new cache for all of them)."""

    job: Job
    cache: DynamicCache | None = None
    filled: int = 0  # prompt tokens in its cache


@dataclass(eq=False)
class _Row:
    """A request in the running batch."""

    job: Job
    tokens: torch.Tensor | None  # [1, prompt + generated] for its processors and stopping criteria (None: neither)
    processors: LogitsProcessorList
    generator: torch.Generator | None
    position: int  # the position of its last sampled token, the next step's input


def refusal(model) -> str | None:
    """Why ``model`` cannot batch continuously (None: it can)."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return f"{config.model_type} has sliding-window layers, whose KV cache rows cannot shift"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return f"{config.model_type} has layers other than full attention ({sorted(set(config.layer_types))})"
    return None


class Batcher:
    """One running batch on rank 0 (see the module's docstring).

    Args:
        model: Rank 0's model (``pipe.model``).
        turn: Rank 0's device turn, held for each step boundary's device work.
        move_rows: Rank 0's row move (``Rank0.move_rows``): rank 0's caches and the stages' alike.
        release: Tells the stages to drop caches rank 0 let go (``Ring.release_freed``), after a
            batch empties.
        on_logits: For tests: called with ``(job, logits [V])`` for each token a row samples.
        piece: Prompt tokens prefilled per step boundary (``PREFILL_PIECE``).
    """

    def __init__(self, model, *, turn: DeviceTurn, move_rows: Callable, release: Callable[[], None] = lambda: None,
                 on_logits: Callable | None = None, piece: int = PREFILL_PIECE) -> None:
        reason = refusal(model)
        if reason is not None:
            raise OptionsError(f"continuous batching: {reason}; run one request per lane")
        if piece < 1:
            raise OptionsError(f"piece={piece} is out of range: it must be at least 1")
        self.model, self.turn, self.move_rows, self.release, self.on_logits = model, turn, move_rows, release, on_logits
        self.piece = piece
        self.device = model.device
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._queue: collections.deque[Job] = collections.deque()
        self._taken: list[Job] = []  # every job taken from the queue and not yet ended, wherever it is
        self._joining: list[_Joining] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 for a real position, 0 for padding
        self._next: torch.Tensor | None = None  # [B] each row's last sampled token, the next step's input
        self._lock = threading.Condition()
        self.steps = 0  # decode steps run
        self.row_steps = 0  # rows summed over those steps
        self.seconds = {"prefill": 0.0, "decode": 0.0}  # wall time in each, joins and leaves included

    # -- what the engine reads -------------------------------------------------------------
    @property
    def load(self) -> int:
        """Requests in this batcher: running, prefilling and queued."""
        return len(self._rows) + len(self._joining) + len(self._queue)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    def figures(self) -> dict:
        """Rows, prefilling and queued requests now; decode steps, mean rows per step, and the seconds
        spent prefilling and decoding so far (where a batch's time goes)."""
        return {"rows": len(self._rows), "prefilling": len(self._joining), "queued": len(self._queue),
                "steps": self.steps, "mean_rows": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
                **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}

    def submit(self, job: Job) -> Future:
        """Queue ``job``; it joins at the next step boundary. Returns its ``done`` future."""
        with self._lock:
            self._queue.append(job)
            self._lock.notify()
        return job.done

    # -- one step boundary -----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One step boundary (see the module's docstring); returns whether work is left.

        A failure (a lost stage, a bad input) ends every request of this batch with it; the
        batcher stays usable.
        """
        with self._lock:
            self._joining += [_Joining(job) for job in self._queue]
            self._taken = [job for job in self._taken if not job.done.done()] + list(self._queue)
            self._queue.clear()
        try:
            with self.turn.held():
                self._drop_cancelled()
                began = time.perf_counter()
                self._prefill()
                prefilled = time.perf_counter()
                if self._rows:
                    self._decode()
                self.seconds["prefill"] += prefilled - began
                self.seconds["decode"] += time.perf_counter() - prefilled
            self.turn.pass_on()
        except BaseException as exc:  # noqa: BLE001 - every request of this batch gets it
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        return bool(self._rows or self._joining or self._queue)

    def _prefill(self) -> None:
        """One prefill forward: the oldest waiting request's next piece where its prompt is long,
        else every waiting short prompt that fits in ``piece`` padded tokens, as one batch
        left-padded as a batched ``generate()`` pads it (one round of the stages for all of them).
        Requests whose prompt is in move into the batch."""
        if not self._joining:
            return
        first = self._joining[0]
        if first.filled or len(first.job.input_ids) > self.piece:
            if first.cache is None:
                first.cache = DynamicCache(config=self.model.config)
            ids = first.job.input_ids
            end = min(len(ids), first.filled + self.piece)
            logits = self._forward(torch.tensor([ids[first.filled:end]], device=self.device),
                                   torch.ones(1, end, dtype=torch.long, device=self.device),
                                   torch.arange(first.filled, end, device=self.device)[None], first.cache)
            first.filled = end
            if end == len(ids):
                self._joining.remove(first)
                self._join(first.cache, [first.job], torch.ones(1, end, dtype=torch.long, device=self.device), logits)
            return
        group: list[_Joining] = []
        for joining in self._joining:
            width = max([len(joining.job.input_ids)] + [len(j.job.input_ids) for j in group])
            if joining.filled or width > self.piece or (group and (len(group) + 1) * width > self.piece):
                continue
            group.append(joining)
        width = max(len(j.job.input_ids) for j in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, joining in enumerate(group):
            n = len(joining.job.input_ids)
            ids[i, width - n:] = torch.tensor(joining.job.input_ids, device=self.device)
            mask[i, width - n:] = 1
            self._joining.remove(joining)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self._join(cache, [j.job for j in group], mask, self._forward(ids, mask, positions, cache))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The model on ``ids`` [B, S] with ``cache``: the last position's logits [B, V]. The output goes
        at once: it holds the cache, which a batch that empties must let go of."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                          **{self.cache_kw: cache}).logits[:, -1]

    def _join(self, cache: DynamicCache, jobs: list[Job], mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample the first token of each request prefilled in ``cache`` (its rows, ``mask`` [B, L]) and
        move those that go on into the batch."""
        joined, keep, tokens = [], [], []
        new = [self._new_row(job) for job in jobs]
        for i, (row, token) in enumerate(zip(new, self._pick(new, logits))):
            if not self._emit(row, token):  # one done at its first token never joins
                joined.append(row)
                keep.append(i)
                tokens.append(token)
        if not joined:
            return
        parts, masks = [rows.Part(cache, tuple(keep), 0)], [mask[keep]]
        if self._cache is not None:
            parts.insert(0, rows.Part(self._cache, tuple(range(len(self._rows))), 0))
            masks.insert(0, self._mask)
        width = max(m.shape[1] for m in masks)
        parts = [rows.Part(p.source, p.rows, width - m.shape[1]) for p, m in zip(parts, masks)]
        target = self._cache if self._cache is not None else cache
        if len(parts) > 1 or len(keep) < len(jobs):  # requests starting a batch whole are where they belong
            self.move_rows(target, parts)
        self._cache = target
        self._mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        fresh = torch.tensor(tokens, device=self.device)
        self._next = torch.cat([self._next, fresh]) if self._rows else fresh
        self._rows += joined

    def _decode(self) -> None:
        """One decode step for every row; rows that end leave."""
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
        positions = torch.tensor([[r.position] for r in self._rows], device=self.device)
        logits = self._forward(self._next[:, None], self._mask, positions, self._cache)
        self.steps += 1
        self.row_steps += len(self._rows)
        tokens = self._pick(self._rows, logits)
        ended = [i for i, (row, token) in enumerate(zip(self._rows, tokens)) if self._emit(row, token)]
        self._next = torch.tensor(tokens, device=self.device)
        if ended:
            self._leave(ended)

    # -- rows ------------------------------------------------------------------------------
    def _new_row(self, job: Job) -> _Row:
        s = job.sampling
        config = copy.deepcopy(self.model.generation_config)
        config.update(**{k: v for k, v in (("do_sample", s.do_sample), ("temperature", s.temperature),
                                            ("top_p", s.top_p), ("top_k", s.top_k)) if v is not None})
        tokens = torch.tensor([job.input_ids], device=self.device)
        # generate()'s own processors and warpers for this request's settings
        processors = self.model._get_logits_processor(
            generation_config=config, input_ids_seq_length=tokens.shape[1], encoder_input_ids=tokens,
            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=self.device, model_kwargs={})
        generator = None
        if s.do_sample and s.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(s.seed)
        kept = tokens if len(processors) or job.stopping is not None else None
        return _Row(job, kept, processors, generator, position=len(job.input_ids) - 1)

    def _pick(self, batch: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits [B, V], as generate() picks it: the row's processors,
        then argmax or a draw from its own generator; one copy to the host for the whole batch."""
        scores = logits.to(dtype=torch.float32, copy=True)
        for i, row in enumerate(batch):
            if len(row.processors):
                scores[i:i + 1] = row.processors(row.tokens, scores[i:i + 1])
            if self.on_logits is not None:
                self.on_logits(row.job, logits[i])
        picked = scores.argmax(dim=-1)
        for i, row in enumerate(batch):
            if row.job.sampling.do_sample:
                picked[i] = torch.multinomial(torch.softmax(scores[i:i + 1], dim=-1), num_samples=1,
                                              generator=row.generator)[0, 0]
        for row, token in zip(batch, picked):
            if row.tokens is not None:
                row.tokens = torch.cat([row.tokens, token.view(1, 1)], dim=1)
            row.position += 1
        return picked.tolist()

    def _emit(self, row: _Row, value: int) -> bool:
        """Hand the token on; True if the request has ended (end of sequence, length, cancelled)."""
        job = row.job
        job.output_ids.append(value)
        if job.on_token is not None:
            job.on_token(value)
        if value in self.eos or (job.stopping is not None and bool(job.stopping(row.tokens, None).any())):
            job.done.set_result("stop")
        elif len(job.output_ids) >= job.sampling.max_new_tokens:
            job.done.set_result("length")
        elif job.cancel.is_set():
            job.done.set_result("stop")
        return job.done.done()

    def _drop_cancelled(self) -> None:
        for joining in [j for j in self._joining if j.job.cancel.is_set()]:
            self._joining.remove(joining)
            joining.job.done.set_result("stop")
        gone = [i for i, r in enumerate(self._rows) if r.job.cancel.is_set()]
        for i in gone:
            self._rows[i].job.done.set_result("stop")
        if gone:
            self._leave(gone)

    def _leave(self, gone: list[int]) -> None:
        """Rows ``gone`` leave the batch; columns that are padding in every remaining row go too."""
        keep = [i for i in range(len(self._rows)) if i not in set(gone)]
        if not keep:
            self._reset()
            self.release()
            return
        mask = self._mask[keep]
        trim = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # leading padding shared by every row
        self.move_rows(self._cache, [rows.Part(self._cache, tuple(keep), -trim)])
        self._mask, self._next = mask[:, trim:], self._next[keep]
        self._rows = [self._rows[i] for i in keep]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next = [], None, None, None

    def _fail(self, exc: BaseException) -> None:
        """Every job taken and not ended gets ``exc`` (also one caught between prefill and joining)."""
        self._reset()
        self._joining = []
        for job in self._taken:
            if not job.done.done():
                job.done.set_exception(exc)
        self._taken = []

    # -- the thread ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, sleeping while there is nothing to do."""
        while not stop.is_set():
            if not self.step():
                with self._lock:
                    while not self._queue and not stop.is_set():
                        self._lock.wait(0.1)
