"""Sequence lanes: several sequences in flight at once, so every stage has work.

In a plain pipeline only one stage works at a time. A lane is a sequence (or sub-batch)
with its own KV cache on every stage; while stage 1 works on lane A's step, stage 0 works
on lane B's. Each rank-0 KV cache object is its own lane (see ``stage.RemoteSpan``), so
any ``generate()`` calls made at once from several threads run as separate lanes, and the
driver routes each stage reply to the thread that asked (see ``runtime.Driver``). This
module splits one batched ``generate()`` call into such concurrent sub-batches.
"""

from __future__ import annotations

import torch

from ..workers import POOL


def split_generate(generate, *, lanes: int, pad_with: int, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Split the batch into ``lanes`` sub-batches, generate them concurrently, merge as transformers would.

    Sub-batches that finish early are right-padded with ``pad_with``, as transformers pads
    the finished sequences of one batch.
    """
    parts = [p for p in torch.tensor_split(torch.arange(input_ids.shape[0]), lanes) if len(p)]
    results: list[torch.Tensor | None] = [None] * len(parts)
    errors: list[BaseException] = []

    def run(j: int, rows: torch.Tensor) -> None:
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == input_ids.shape[:1] else v) for k, v in kwargs.items()}
        try:
            results[j] = generate(input_ids=input_ids[rows], **sub)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    # Kept threads, not new ones: a new thread has no cuDNN attention plans (see ``workers``).
    for done in [POOL.submit(run, j, rows) for j, rows in enumerate(parts)]:
        done.result()
    if errors:
        raise errors[0]
    width = max(r.shape[1] for r in results)
    padded = [torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_with) for r in results]
    return torch.cat(padded, dim=0)
