"""Speculative decoding through the pipeline: transformers' own assisted generation, counted.

transformers proposes tokens, by n-gram lookup in the text so far (``prompt_lookup_num_tokens``)
or with a draft model on rank 0 (``assistant_model``), and verifies all of them in one forward of
the pipeline's model: one trip round the ring for up to k+1 tokens, where plain decoding makes
one trip per token. After each verification HF crops its cache to the accepted tokens; rank 0's
placeholders see the crop (``lanes.CacheLanes.moved_back``) and the stages crop their caches of
that lane to the same length (``model.stage.StageRunner.lane_cache``), so the tokens are exactly
those of the same assisted call in one process.

Here: what each call proposed and accepted (``Speculation``), and a call's pause while its
proposals do not pay (``Proposals``, ``Cutoff``): a rejected proposal costs a verification step
wider than one token, which on a compute-bound device is slower than the plain step it replaces.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Cutoff:
    """When a call pauses its proposals: once it has proposed ``after`` tokens (since it last
    resumed), if its steps that verified proposals gave fewer tokens per second than its plain
    steps (those with nothing to propose, or ``probes`` plain steps it then takes to measure them).
    It then decodes one token a step, as plain generation does, for ``pause`` steps, twice as many
    at each further pause (at most ``longest``), and proposes again: an answer that starts in its
    own words and then copies the prompt still gains. Measured, not a fixed acceptance rate: what a
    rejected proposal costs is the device's (a verification step of 8 tokens took 1.8 plain steps
    on a 2-core CPU, and about one on a GPU or a Mac reading a large model's weights).

    Raises:
        ValueError: for a count out of range.
    """

    after: int = 24
    probes: int = 2
    pause: int = 8
    longest: int = 64

    def __post_init__(self) -> None:
        if self.after < 0 or self.probes < 1 or not 1 <= self.pause <= self.longest:
            raise ValueError(f"{self}: after must be >= 0, probes >= 1, and 1 <= pause <= longest")


@dataclass(eq=False)
class Speculation:
    """Proposed and accepted tokens of every assisted generate() call on this pipeline."""

    calls: int = 0
    steps: int = 0  # verification steps that checked at least one proposed token
    proposed: int = 0
    accepted: int = 0
    switched_off: int = 0  # calls that paused their proposals at least once (see ``Cutoff``)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, proposed: int, accepted: int) -> None:
        with self._lock:
            self.steps += proposed > 0
            self.proposed += proposed
            self.accepted += accepted

    def figures(self) -> dict:
        """``speculation``: calls, verification steps, proposed and accepted tokens, the acceptance rate
        (accepted / proposed; None before any proposal) and the calls that paused it."""
        with self._lock:
            rate = self.accepted / self.proposed if self.proposed else None
            return {"speculation": {"calls": self.calls, "steps": self.steps, "proposed": self.proposed,
                                    "accepted": self.accepted, "acceptance": rate, "switched_off": self.switched_off}}


class Proposals:
    """transformers' candidate generator for one call, counted into a ``Speculation``, pausing its
    proposals while its ``Cutoff`` finds them slower than plain steps. Everything else is the
    wrapped generator's (HF reads its attributes, e.g. ``requires_model_outputs``)."""

    def __init__(self, inner, speculation: Speculation, cutoff: Cutoff | None) -> None:
        self.inner, self.speculation, self.cutoff = inner, speculation, cutoff
        self.proposed = 0  # since proposals last resumed
        self.paused = 0  # plain steps left before proposing again
        self.pauses = 0
        self._probe = False  # this step is a plain one taken to measure plain steps
        self._began = 0.0
        self._rates = {True: [0.0, 0], False: [0.0, 0]}  # proposed? -> [seconds, tokens] (proposals: since resumed)
        with speculation._lock:
            speculation.calls += 1

    @property
    def off(self) -> bool:
        return self.paused > 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_candidates(self, input_ids: torch.LongTensor, *args, **kwargs):
        self._began = time.perf_counter()
        cut = self.cutoff
        self._probe = (cut is not None and not self.off and self.proposed >= cut.after
                       and self._rates[False][1] < cut.probes)
        if self.off or self._probe:  # no candidates: HF verifies one position, a plain decode step
            return input_ids, None
        return self.inner.get_candidates(input_ids, *args, **kwargs)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches) -> None:
        proposed, accepted = scores.shape[1] - 1, int(num_matches)  # scores: one row per proposed token, + the bonus
        rate = self._rates[proposed > 0]
        rate[0] += time.perf_counter() - self._began  # proposing (a draft's forwards too) and verifying
        rate[1] += 1 + accepted
        self.proposed += proposed
        self.speculation.add(proposed, accepted)
        if self.off:
            self.paused -= 1
            if not self.paused:  # resume: judged afresh on what it proposes from now on
                self.proposed, self._rates[True] = 0, [0.0, 0]
            return
        if not self._probe:
            self.inner.update_candidate_strategy(input_ids, scores, num_matches)
        cut = self.cutoff
        (spec_s, spec_n), (plain_s, plain_n) = self._rates[True], self._rates[False]
        if (cut is not None and self.proposed >= cut.after and plain_n >= cut.probes
                and spec_n * plain_s < plain_n * spec_s):  # tokens per second: proposals' below plain steps'
            self.paused = min(cut.longest, cut.pause * 2 ** self.pauses)
            self.pauses += 1
            if self.pauses == 1:
                with self.speculation._lock:
                    self.speculation.switched_off += 1


def counted_candidates(model, speculation: Speculation, cutoff: Cutoff | None = None):
    """A ``_get_candidate_generator`` for ``model`` (``rank0.install`` puts it in place) whose
    generators are ``Proposals``: transformers builds its own, this counts what it proposes."""
    original = model._get_candidate_generator

    def get_candidate_generator(*args, **kwargs):
        # Sampling keeps transformers' own draws (a pause would change how many are taken, and so
        # the seeded tokens): only greedy calls pause.
        config = kwargs.get("generation_config")
        sampled = config is not None and getattr(config, "do_sample", False)
        return Proposals(original(*args, **kwargs), speculation, None if sampled else cutoff)

    return get_candidate_generator
