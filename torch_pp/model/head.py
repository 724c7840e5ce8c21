"""The LM head split by rows between rank 0 and the last stage, each multiplying its part at once.

In one stream's decode step the stages work in turn, and whatever a stage does is on the
critical path. The LM head is the largest single multiply of a small model (SmolLM2-135M: its
49,152-row head is a fifth of the weights), and it used to wait until the last stage's hidden
state reached rank 0. Split by vocabulary rows, the last stage multiplies its rows right after
sending the hidden state, while rank 0 multiplies the others: the two halves overlap, and the
step is shorter by about half the head, less one small message.

* ``TailHead`` (last stage, here): the model's own final norm and the head's rows from ``cut``
  on; ``logits(hidden)`` is ``lm_head(norm(hidden))`` for those rows.
* ``rank0.head.SplitHead`` (rank 0): the same norm and the rows before ``cut``, joined to the
  last stage's for HF's ``lm_head`` call.

A row's logit is the same dot product whichever rows are multiplied with it, provided the
kernels keep their blocking and order of work: ``cut`` is a multiple of
``placement.sizing.ROW_BLOCK`` (where the cut is decided: ``placement.sizing.head_split``), and
rank 0 checks at start-up, for each number of rows (sequences x positions kept) from 1 to 8,
that its halves equal its whole head bit for bit (``identical_rows``); a step of any other size,
or of a size that failed the check on this device, multiplies the whole head on rank 0. Pure model
math: no communication.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
