"""Run under torchrun by bench_lanes.py: one greedy batch in a given number of lanes, on rank 0.

Each turn (``run {"batch", "lanes", "new"}``) reports the wall time, rank 0's CPU seconds, every
stage's compute seconds in the run (from its spans) and the tokens. The second argument is a
``balance`` or a manual plan (``0:12,12:30``), the third the dtype, the fourth ``auto``, ``on`` or
``off``: the LM head split with the last stage.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_pp  # noqa: E402
from _common import load_tokenizer, make_inputs, serve_turns  # noqa: E402
from torch_pp import perf  # noqa: E402
from torch_pp.trace import now  # noqa: E402

model_dir, balance, dtype, split = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
pipe = torch_pp.start(model_dir, **({"layers": balance} if ":" in balance else {"balance": balance}), dtype=dtype, progress=False,
                      split_head={"auto": None, "on": True, "off": False}[split])
if pipe.is_driver:
    tok = load_tokenizer(model_dir)

    def run_once(spec: dict) -> dict:
        inputs = make_inputs(tok, [f"Tell me something about topic number {i}." for i in range(spec["batch"])])
        new = spec["new"]
        t0, cpu0, start = now(), time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out = pipe.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, lanes=spec["lanes"],
                                      pad_token_id=tok.pad_token_id if tok is not None else 0)
        wall, cpu, t1 = time.perf_counter() - start, time.process_time() - cpu0, now()
        spans = perf.breakdown(pipe.stats(spans_since=t0), start=t0, end=t1)
        return {"wall_s": wall, "rank0_cpu_s": cpu,
                "stage_compute_s": [s["compute_s"] for s in spans], "tokens": out[:, inputs["input_ids"].shape[1]:].tolist()}

    serve_turns(run_once, dict)
pipe.close()
