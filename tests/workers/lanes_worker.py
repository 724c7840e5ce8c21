"""Sequence lanes equal transformers on the same sub-batches (run under torchrun by test_lanes)."""

import json
import os
import sys
import threading

import torch
from transformers import AutoModelForCausalLM

import torch_pp

path = sys.argv[1]
pipe = torch_pp.start(path, progress=False, dtype="float32")  # on TORCH_PP_DEVICE (the tests: cpu)
if pipe.is_driver:
    n = pipe.plan.num_stages
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(pipe.device).eval()
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(3, 250, (6, 12), generator=g)
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    mask[4, :7] = 0
    batch[mask == 0] = 0
    batch, mask = batch.to(pipe.device), mask.to(pipe.device)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    report = {"lane_threads": []}
    seen = set()  # the threads that ran rank 0's forward passes
    hook = pipe.model.get_input_embeddings().register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    for lanes in (2, 2, 3):
        parts = torch.tensor_split(torch.arange(6), lanes)
        want = torch.cat([ref.generate(batch[p], attention_mask=mask[p], **kw) for p in parts])
        seen.clear()
        report[f"lanes{lanes}"] = torch.equal(pipe.model.generate(batch, attention_mask=mask, lanes=lanes, **kw), want)
        report["lane_threads"].append(sorted(seen))
    hook.remove()
    from torch_pp.rank0.workers import POOL

    report["threads_made"] = POOL.threads
    # Default: one lane, the whole batch as transformers runs it.
    want = ref.generate(batch, attention_mask=mask, **kw)
    before = pipe.stats()[1]["forwards"]
    report["default"] = torch.equal(pipe.model.generate(batch, attention_mask=mask, **kw), want)
    report["default_forwards"] = pipe.stats()[1]["forwards"] - before
    # Two threads' calls run as two lanes; one that finishes early does not disturb one that runs on.
    results = {}

    def run(name, ids, new):
        results[name] = pipe.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, lanes=1)

    a, b = batch[:1], batch[2:3]
    threads = [threading.Thread(target=run, args=("short", a, 3)), threading.Thread(target=run, args=("long", b, 40))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["short_ok"] = torch.equal(results["short"], ref.generate(a, max_new_tokens=3, min_new_tokens=3, do_sample=False))
    report["long_ok"] = torch.equal(results["long"], ref.generate(b, max_new_tokens=40, min_new_tokens=40, do_sample=False))
    report["single_after"] = torch.equal(pipe.model.generate(batch[:1], **kw), ref.generate(batch[:1], **kw))
    with open(os.path.join(os.environ["OUT"], "lanes.json"), "w") as f:
        json.dump(report, f)
    pipe.close()
