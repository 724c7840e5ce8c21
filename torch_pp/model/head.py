"""The LM head split by rows between rank 0 and the last stage, each multiplying its part at once.

In one stream's decode step the stages work in turn, and whatever a stage does is on the
critical path. The LM head is the largest single multiply of a small model (SmolLM2-135M: its
49,152-row head is a fifth of the weights, about 9 ms of a 60 ms token on a CPU), and it used to
wait until the last stage's hidden state reached rank 0. Split by vocabulary rows, the last stage
multiplies its rows right after sending the hidden state, while rank 0 multiplies the others:
the two halves overlap, and the step is shorter by about half the head, less one small message.

* ``TailHead`` (last stage): the model's own final norm and the head's rows from ``cut`` on;
  ``logits(hidden)`` is ``lm_head(norm(hidden))`` for those rows.
* ``SplitHead`` (rank 0): ``begin(hidden)`` computes the same norm and the rows before ``cut``
  while the last stage computes the rest, ``finish(tail)`` joins them, and the model's
  ``lm_head`` (wrapped in place: module, parameter names and hooks unchanged) returns the joined
  logits when HF calls it on exactly the normalised hidden state ``begin`` saw; on anything else it
  multiplies as before.

A row's logit is the same dot product whichever rows are multiplied with it, provided the
kernels keep their blocking and order of work: ``cut`` is a multiple of
``placement.sizing.ROW_BLOCK`` (where the cut is decided: ``placement.sizing.head_split``), and
rank 0 checks at start-up, for each number of rows (sequences x positions kept) from 1 to 8,
that its halves equal its whole head bit for bit (``identical_rows``); a step of any other size,
or of a size that failed the check on this device, multiplies the whole head on rank 0. Pure model
math: no communication.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("torch_pp")

PROBED_ROWS = range(1, 9)  # a split step multiplies at most this many rows (batch x positions kept)


def identical_rows(weight: torch.Tensor, cut: int, rows=PROBED_ROWS) -> frozenset[int]:
    """The numbers of rows (sequences x positions) for which ``weight``'s rows ``[:cut]`` and ``[cut:]``
    multiplied apart equal the whole product bit for bit on this device. A kernel picks its blocking
    by the problem's shape, and on some CPUs some shapes round otherwise."""
    same = set()
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        for m in rows:
            x = torch.randn(m, 1, weight.shape[1], generator=gen).to(device=weight.device, dtype=weight.dtype)
            whole = F.linear(x, weight)
            if (torch.equal(whole[..., :cut], F.linear(x, weight[:cut]))
                    and torch.equal(whole[..., cut:], F.linear(x, weight[cut:]))):
                same.add(m)
    return frozenset(same)


class TailHead:
    """On the last stage: the final norm and the LM head's rows from ``cut`` on.

    Args:
        norm: The model's own final norm module (its weights loaded).
        head: A bias-free ``nn.Linear`` holding the head's rows ``[cut:]``, [V - cut, H].
    """

    def __init__(self, norm: nn.Module, head: nn.Linear) -> None:
        self.norm, self.head = norm, head
        self.steps = 0

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, K, H] -> this part's logits [B, K, V - cut]."""
        self.steps += 1
        return F.linear(self.norm(hidden), self.head.weight)

    def figures(self) -> dict:
        """``head_rows``: the head rows this stage multiplies; ``head_steps``: the steps it did."""
        return {"head_rows": self.head.out_features, "head_steps": self.steps}


class SplitHead:
    """On rank 0: its rows of the split head, and the logits joined for HF's ``lm_head`` call.

    Args:
        head: The model's ``lm_head`` (a bias-free ``nn.Linear``), wrapped in place.
        norm: The model's final norm module.
        cut: Head rows rank 0 multiplies; the last stage multiplies the rest.
        rows: The numbers of rows (sequences x positions kept) a step may have to be split: those
            whose parts were checked to equal the whole head (see ``identical_rows``).
    """

    def __init__(self, head: nn.Linear, norm: nn.Module, *, cut: int, rows: frozenset[int] = frozenset(PROBED_ROWS)) -> None:
        self.head, self.norm, self.cut, self.rows = head, norm, cut, rows
        self._forward = head.forward
        self._local = threading.local()  # per thread: the step in progress
        self.steps = self.fallbacks = 0
        head.forward = self._lm_head

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

    def begin(self, hidden: torch.Tensor) -> None:
        """Rank 0's rows for ``hidden`` [B, K, H], the last stage's hidden state (while it does the rest)."""
        self._local.step = None
        x = self.norm(hidden)
        self._local.step = (x, F.linear(x, self.head.weight[: self.cut]), False)

    def finish(self, tail: torch.Tensor) -> None:
        """Join the last stage's logits [B, K, V - cut] to rank 0's, for the coming ``lm_head`` call."""
        x, own, _ = self._local.step
        self._local.step = (x, torch.cat([own, tail], dim=-1), True)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        step, self._local.step = getattr(self._local, "step", None), None
        if step is not None and step[2] and step[0].shape == x.shape and torch.equal(step[0], x):
            self.steps += 1
            return step[1]
        if step is not None:  # the family did something between the norm and the head: multiply it here
            self.fallbacks += 1
        return self._forward(x)

    def figures(self) -> dict:
        """``head_rows``: the rows rank 0 multiplies; ``head_steps``: the steps whose logits were joined;
        ``head_fallbacks``: the split steps HF's ``lm_head`` was then called on something else."""
        return {"head_rows": self.cut, "head_steps": self.steps, "head_fallbacks": self.fallbacks}
