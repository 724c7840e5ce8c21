"""Continuous batching on a pipeline (run under torchrun by test_batch): a fixed join/leave schedule,
each request's tokens against transformers alone, every sampled row's logits saved for the
test to compare across stage counts; generate_many; nothing left on the stages."""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import torch_pp
from torch_pp.rank0.batch import Job, Sampling
from torch_pp.rank0.batches import making

path, out = sys.argv[1], os.environ["OUT"]
# Unchunked prefill: the same operations in every stage count, so the logits can be compared bit for bit.
pipe = torch_pp.start(path, progress=False, dtype="float32", prefill_chunk=0, split_head=os.environ.get("SPLIT") == "1",
                      graphs=True if os.environ.get("GRAPHS") == "1" else None)
if pipe.is_driver:
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = pipe.model.generation_config.eos_token_id = None  # fixed lengths
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 17, 2, 30, 3, 12)]
    news = [12, 6, 20, 9, 15, 4]

    def alone(ids, n, **kw):
        t = torch.tensor([ids])
        return ref.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, **kw)[0, len(ids):].tolist()

    logits = {}
    # Prompts over 8 tokens are prefilled 8 at a time between the others' steps; shorter ones
    # that arrive together as one left-padded batch.
    make = making(pipe.model, pipe.rank0, on_logits=lambda job, l: logits.setdefault(id(job), []).append(l.clone()), piece=8)
    batcher = make()
    jobs = [Job(tuple(p), Sampling(max_new_tokens=n)) for p, n in zip(prompts, news)]
    sampled = [Job(tuple(prompts[1]), Sampling(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=7)),
               Job(tuple(prompts[3]), Sampling(max_new_tokens=14, do_sample=True, top_k=0, seed=3))]
    # The schedule: two start (one long: prefilled in pieces while the other decodes); two short
    # ones join after 3 steps (prefilled together as one padded batch), a long one the step after
    # (longer than the batch: the batch shifts right); rows leave as they end; then two sampled
    # rows and a late one.
    schedule = {0: jobs[:2], 3: [jobs[2], jobs[4]], 4: [jobs[3]], 9: [sampled[0]], 10: [sampled[1]], 12: [jobs[5]]}
    boundary = 0
    while boundary in schedule or boundary <= max(schedule) or batcher.load:
        for job in schedule.get(boundary, []):
            batcher.submit(job)
        batcher.step()
        if boundary == 2:  # the long prompt is still being prefilled, piece by piece, while the short one decodes
            interleaved = [len(jobs[0].output_ids), len(jobs[1].output_ids), batcher.figures()["prefilling"]]
        boundary += 1
    report = {"greedy": [j.output_ids == alone(p, n, do_sample=False) for j, p, n in zip(jobs, prompts, news)],
              "finish": [j.done.result() for j in jobs + sampled], "figures": batcher.figures(),
              "interleaved": interleaved}
    torch.manual_seed(7)
    want = alone(prompts[1], 10, do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
    torch.manual_seed(3)
    report["sampled"] = [sampled[0].output_ids == want,
                         sampled[1].output_ids == alone(prompts[3], 14, do_sample=True, top_k=0)]
    torch.save([torch.stack(logits[id(j)]) for j in jobs + sampled], os.path.join(out, f"logits{pipe.plan.num_stages}{os.environ.get('TAG', '')}.pt"))
    # generate_many over two batches in flight: every prompt back, each equal to it alone.
    many = list(pipe.generate_many(prompts, max_new_tokens=8, batches=2))
    report["many_order"] = sorted(f.index for f in many)
    report["many"] = all(f.output_ids == alone(prompts[f.index], 8, do_sample=False) and f.finish_reason == "length"
                         for f in many)
    # A stopped iteration ends the rest: nothing runs on afterwards.
    first = next(iter(pipe.generate_many(prompts, max_new_tokens=30)))
    report["first_of_many"] = first.output_ids == alone(prompts[first.index], 30, do_sample=False)
    import gc

    del batcher, make
    gc.collect()
    pipe.rank0.ring.release_freed() if pipe.rank0.ring else None
    stats = pipe.stats()
    report["kv_lanes"] = [s.get("kv_lanes", 0) for s in stats[1:]]
    report["slots"] = [s.get("slots", 0) for s in stats]  # with graphs=True: a slot per batch size the rows took
    with open(os.path.join(out, f"batch{pipe.plan.num_stages}{os.environ.get('TAG', '')}.json"), "w") as f:
        json.dump(report, f)
    pipe.close()
