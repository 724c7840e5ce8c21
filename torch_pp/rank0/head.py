"""Rank 0's half of a split LM head (the last stage's half: ``model.head.TailHead``).

While the last stage multiplies its rows of the head, rank 0 computes the final norm of the
same hidden state and multiplies the rows before ``cut`` (``begin``); the last stage's logits are
then joined to them (``finish``), and the model's ``lm_head`` (wrapped in place by
``rank0.install``: module, parameter names and hooks unchanged) returns the joined logits when
HF calls it on exactly the normalised hidden state ``begin`` saw; on anything else it multiplies
as before. The joined logits wait in a table keyed by the forward's ``Step``, and the ``lm_head``
call, which HF makes with the normalised hidden state alone, finds them by that state's value:
equal states give equal logits, so a match is always right, whichever thread's it was.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn
from torch.nn import functional as F

from ..model.head import PROBED_ROWS, identical_rows
from .step import Step

log = logging.getLogger("torch_pp")


class SplitHead:
    """On rank 0: its rows of the split head, and the logits joined for HF's ``lm_head`` call.

    Args:
        head: The model's ``lm_head`` (a bias-free ``nn.Linear``).
        norm: The model's final norm module.
        cut: Head rows rank 0 multiplies; the last stage multiplies the rest.
        rows: The numbers of rows (sequences x positions kept) a step may have to be split: those
            whose parts were checked to equal the whole head (see ``model.head.identical_rows``).
    """

    def __init__(self, head: nn.Linear, norm: nn.Module, *, cut: int, rows: frozenset[int] = frozenset(PROBED_ROWS)) -> None:
        self.head, self.norm, self.cut, self.rows = head, norm, cut, rows
        self.whole = head.forward  # the head's own forward, for whatever is not a joined step
        self._parts: dict[Step, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # step -> (normed, logits, joined)
        self._lock = threading.Lock()
        self.steps = self.fallbacks = 0

    @classmethod
    def checked(cls, head: nn.Linear, norm: nn.Module, *, cut: int) -> "SplitHead | None":
        """A ``SplitHead`` for the numbers of rows this device multiplies apart exactly as whole (None,
        with a warning, if there are none: the head stays whole, the tokens transformers' own)."""
        rows = identical_rows(head.weight, cut)
        if rows:
            return cls(head, norm, cut=cut, rows=rows)
        log.warning("rank 0: multiplied apart, the LM head's rows round differently from the whole head on %s; "
                    "the head is not split", head.weight.device)
        return None

    def wants(self, batch: int, keep: int) -> bool:
        """Whether a forward returning ``keep`` positions of ``batch`` sequences is split: decode steps
        and prompts' last positions of up to 8 sequences, where checked (a loss over all positions,
        or a large batch, whose head is no longer one stream's latency, multiplies it whole)."""
        # With gradients on, HF's lm_head must be the one that multiplies (autograd records it).
        return keep >= 1 and batch * keep in self.rows and not torch.is_grad_enabled()

    def begin(self, hidden: torch.Tensor, step: Step) -> None:
        """Rank 0's rows for ``hidden`` [B, K, H], the last stage's hidden state (while it does the rest)."""
        x = self.norm(hidden)
        with self._lock:
            self._parts[step] = (x, F.linear(x, self.head.weight[: self.cut]), False)

    def finish(self, tail: torch.Tensor, step: Step) -> None:
        """Join the last stage's logits [B, K, V - cut] to rank 0's, for the coming ``lm_head`` call."""
        with self._lock:
            x, own, _ = self._parts[step]
            self._parts[step] = (x, torch.cat([own, tail], dim=-1), True)

    def settle(self, step: Step) -> None:
        """At the end of ``step``'s forward: drop its parts; a join HF's ``lm_head`` never took counts
        as a fallback (the family did something between the norm and the head)."""
        with self._lock:
            parts = self._parts.pop(step, None)
            if parts is not None and parts[2]:
                self.fallbacks += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``lm_head``'s forward in place of its own: the joined logits of ``x``, else the whole head's."""
        with self._lock:
            for step, (normed, logits, joined) in self._parts.items():
                if joined and normed.shape == x.shape and torch.equal(normed, x):
                    del self._parts[step]
                    self.steps += 1
                    return logits
        return self.whole(x)

    def figures(self) -> dict:
        """``head_rows``: the rows rank 0 multiplies; ``head_steps``: the steps whose logits were joined;
        ``head_fallbacks``: the split steps HF's ``lm_head`` was then called on something else."""
        return {"head_rows": self.cut, "head_steps": self.steps, "head_fallbacks": self.fallbacks}
