"""Many prompts at once through continuous batching, back as each finishes (``Pipeline.generate_many``)."""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..errors import OptionsError
from .batch import Batcher, Job, Sampling
from .batches import Batches


@dataclass(frozen=True)
class Finished:
    """One prompt's completion.

    Attributes:
        index: The prompt's position in the list given.
        output_ids: Its new tokens.
        text: Those tokens decoded (special tokens skipped), where the prompt was a string.
        finish_reason: ``"stop"`` (end of sequence) or ``"length"`` (``max_new_tokens`` reached).
    """

    index: int
    output_ids: list[int]
    text: str | None
    finish_reason: str


def generate_many(make: Callable[[], Batcher], prompts: Sequence, *, tokenizer=None, batches: int = 1,
                  **sampling) -> Iterator[Finished]:
    """Run every prompt through continuous batching; yield each as it finishes.

    Requests join and leave the running batches at step boundaries (``rank0.batch``); each
    prompt's tokens equal a ``generate()`` call of it alone (greedy; seeded sampling draws from
    the prompt's own generator). Full-attention models only (no sliding windows). Stopping the
    iteration early cancels the prompts still running.

    Args:
        make: Makes a batcher on rank 0's pipeline.
        prompts: Strings (tokenized with ``tokenizer``, chat templates not applied) or token id lists.
        tokenizer: Needed for string prompts; decodes their completions.
        batches: Batches in flight.
        **sampling: ``Sampling``'s fields: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
            ``top_k``, ``seed``.

    Raises:
        OptionsError: for a string prompt without a tokenizer, an empty prompt, or settings out of range.
    """
    settings = Sampling(**sampling)
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise OptionsError("generate_many: string prompts need the pipeline's tokenizer")
            p = tokenizer(p)["input_ids"]
            texts.append(True)
        else:
            p = p.tolist() if hasattr(p, "tolist") else list(p)
            texts.append(False)
        if not p:
            raise OptionsError("generate_many: a prompt is empty")
        ids.append(tuple(int(t) for t in p))
    pool = Batches(batches, make)
    jobs = [Job(p, settings) for p in ids]
    try:
        index = {pool.submit(job): i for i, job in enumerate(jobs)}
        for done in concurrent.futures.as_completed(index):
            i = index[done]
            out = jobs[i].output_ids
            text = tokenizer.decode(out, skip_special_tokens=True) if texts[i] else None
            yield Finished(i, list(out), text, done.result())
    finally:  # also when the caller stops iterating early: end the rest, then the threads
        for job in jobs:
            job.cancel.set()
        pool.close()


def choose_batches(make: Callable[[], Batcher], *, vocab_size: int, rows: int = 8, new: int = 8,
                   rounds: int = 2) -> tuple[int, dict[int, float]]:
    """Batches in flight that serve more tokens per second on this pipeline, measured: ``rows``
    greedy random prompts of 16 tokens, ``new`` tokens each, in one batch and in two, alternating
    ``rounds`` times after a warm-up; returns the faster count and each count's median tokens/s.

    Two batches let the stages work at once (one batch's step on one stage while the other's is
    on the next), but each step then carries half the rows, and rank 0 does twice the per-step
    work: which wins is the machines' (on a 2-core CPU one batch of 8 ran 1.17x two of 4).
    """
    import torch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab_size, (16,), generator=g).tolist() for _ in range(rows)]

    def rate(count: int) -> float:
        start = time.perf_counter()
        done = list(generate_many(make, prompts, batches=count, max_new_tokens=new))
        return sum(len(d.output_ids) for d in done) / (time.perf_counter() - start)

    rate(2)  # warm-up: every length, both batchers' threads
    runs: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for count in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs[count].append(rate(count))
    rates = {count: statistics.median(v) for count, v in runs.items()}
    return (2 if rates[2] > rates[1] else 1), rates
