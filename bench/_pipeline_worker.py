"""Run under torchrun by bench_decode.py: time the pipeline's generate() on rank 0."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_pp  # noqa: E402
from _common import make_inputs, median_of, timed_generate  # noqa: E402

model_dir, prompt, new_tokens, reps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
DEVICE, DTYPE = os.environ.get("BENCH_DEVICE", "cpu"), os.environ.get("BENCH_DTYPE", "float32")

pipe = torch_pp.start(model_dir, dtype=DTYPE, device=DEVICE, progress=False)
if pipe.is_driver:
    tok = pipe.tokenizer() if os.path.exists(os.path.join(model_dir, "tokenizer.json")) else None
    inputs = {k: v.to(pipe.device) for k, v in make_inputs(tok, prompt).items()}
    timed_generate(pipe.model, inputs, new_tokens=4)  # warm-up
    base = pipe.stats()
    d0_remote, d0_calls = pipe.driver.remote_s, pipe.driver.calls
    runs = [timed_generate(pipe.model, inputs, new_tokens=new_tokens) for _ in range(reps)]
    stages = pipe.stats()
    remote_s = pipe.driver.remote_s - d0_remote
    remote_compute_s = sum(s["compute_s"] - b["compute_s"] for s, b in zip(stages[1:], base[1:]))
    wall = sum(r["wall_s"] for r in runs)
    result = {
        "ttft_s": median_of(runs, "ttft_s"),
        "decode_tokens_per_s": median_of(runs, "decode_tokens_per_s"),
        "tokens": runs[-1]["tokens"],
        "communication_s": remote_s - remote_compute_s,
        "communication_share": (remote_s - remote_compute_s) / wall,
        "per_boundary_ms": 1000 * (remote_s - remote_compute_s) / ((pipe.driver.calls - d0_calls) * pipe.transport.world_size),
        "stages": stages,
    }
    with open(out, "w") as f:
        json.dump(result, f)
pipe.close()
