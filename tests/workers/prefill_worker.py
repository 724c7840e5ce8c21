"""Pipelined prefill equals the unchunked prefill (run under torchrun by test_prefill)."""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import torch_pp

path = sys.argv[1]
pipe = torch_pp.start(path, progress=False, dtype="float32")  # on TORCH_PP_DEVICE (the tests: cpu)
if pipe.is_driver:
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(pipe.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (1, 40), generator=g)
    batch = torch.randint(3, 250, (3, 30), generator=g)
    mask = torch.ones_like(batch)
    mask[0, :12] = 0  # left padding
    mask[2, :5] = 0
    batch[mask == 0] = 0
    ids, batch, mask = ids.to(pipe.device), batch.to(pipe.device), mask.to(pipe.device)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    want_one, want_batch = ref.generate(ids, **kw), ref.generate(batch, attention_mask=mask, **kw)
    with torch.no_grad():
        want_logits = ref(ids, past_key_values=DynamicCache(config=ref.config), use_cache=True, logits_to_keep=1).logits
    report = {}
    for chunk in (0, 3, 7, 16, None):
        pipe.model.prefill_chunk = chunk
        before = pipe.stats()[1]["forwards"]
        with torch.no_grad():
            logits = pipe.model(ids, past_key_values=DynamicCache(config=ref.config), use_cache=True, logits_to_keep=1).logits
        forwards = pipe.stats()[1]["forwards"] - before
        report[str(chunk)] = {
            "logits_max_diff": (logits - want_logits).abs().max().item(),
            "stage1_forwards": forwards,
            "tokens_equal": torch.equal(pipe.model.generate(ids, **kw), want_one),
            "batch_equal": torch.equal(pipe.model.generate(batch, attention_mask=mask, **kw), want_batch),
        }
    with open(os.path.join(os.environ["OUT"], "prefill.json"), "w") as f:
        json.dump(report, f)
    pipe.close()
