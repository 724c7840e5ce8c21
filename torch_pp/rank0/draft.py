"""Rank 0's draft model for speculative decoding: loaded whole, its decode steps captured like rank 0's own."""

from __future__ import annotations

import torch

from .. import archs
from ..model.stage import layer_arguments
from .install import install
from .local import LocalLayers


def load_draft(folder: str | None, *, device: torch.device, dtype: torch.dtype):
    """Rank 0: the draft model for speculative decoding, whole, on rank 0's device (None without one)."""
    if folder is None:
        return None
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def draft_on_slots(draft, slots: dict) -> LocalLayers:
    """The draft's layers over slots (``StageRunner.use_slots``'s ``slots``), its decode steps captured
    as a one-process pipeline's are (``rank0.local``). An assisted step runs the draft once per proposed
    token, and eagerly on a GPU each of those forwards cost about as much as the big model's captured
    step: a draft accepted 94% of the time then halved the speed (``bench/RESULTS.md``). Its caches
    are marked as ones transformers crops (``drafts``)."""
    layers = archs.LAYOUT.layer_list(draft)
    local = LocalLayers(dict(enumerate(layers)), draft.config, accepts=layer_arguments(layers[0]), slots=slots)
    install(draft, transport=None, device=draft.device, num_stages=1, remote={}, local=local, drafts=True)
    return local
