"""Streamers for a generate() call's figures: when each token arrived, and fanning tokens out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass
class TokenTimer(BaseStreamer):
    """A streamer that records when each new token arrives (for TTFT and decode speed).

    transformers calls ``put`` once with the prompt, then once per generated step: one token
    each, or the tokens a speculative verification step accepted.
    """

    start: float = field(default_factory=time.perf_counter)
    stamps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # tokens per stamp
    _prompt_seen: bool = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        self.tokens.append(value.shape[-1] if value.dim() else 1)

    def end(self) -> None:
        pass

    @property
    def ttft_s(self) -> float | None:
        return self.stamps[0] - self.start if self.stamps else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if len(self.stamps) < 2:
            return None
        return sum(self.tokens[1:]) / (self.stamps[-1] - self.stamps[0])


class Streamers(BaseStreamer):
    """Fan one generation's tokens out to several streamers."""

    def __init__(self, *streamers: BaseStreamer | None) -> None:
        self.streamers = [s for s in streamers if s is not None]

    def put(self, value: torch.Tensor) -> None:
        for s in self.streamers:
            s.put(value)

    def end(self) -> None:
        for s in self.streamers:
            s.end()
