"""Run under torchrun by bench_decode.py / bench_links.py: time the pipeline's generate() on rank 0.

Rank 0 answers the orchestrator's turns (see ``_common.serve_turns``); at the end it reports
the communication time over all repetitions and every stage's figures.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_pp  # noqa: E402
from _common import load_tokenizer, make_inputs, serve_turns, timed_generate  # noqa: E402

model_dir, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
DEVICE, DTYPE = os.environ.get("BENCH_DEVICE", "cpu"), os.environ.get("BENCH_DTYPE", "float32")

pipe = torch_pp.start(model_dir, dtype=DTYPE, device=DEVICE, progress=False)
if pipe.is_driver:
    tok = load_tokenizer(model_dir)
    inputs = {k: v.to(pipe.device) for k, v in make_inputs(tok, prompt).items()}
    timed_generate(pipe.model, inputs, new_tokens=4)  # warm-up
    base = pipe.stats()
    d0_remote, d0_calls = pipe.rank0.timer.remote_s, pipe.rank0.timer.calls
    wall = [0.0]

    def run_once(spec: dict | None = None) -> dict:
        start = time.perf_counter()
        run = timed_generate(pipe.model, inputs, new_tokens=(spec or {}).get("new_tokens", new_tokens))
        wall[0] += time.perf_counter() - start
        return run

    def finish() -> dict:
        stages = pipe.stats()
        remote_s = pipe.rank0.timer.remote_s - d0_remote
        remote_compute_s = sum(s["compute_s"] - b["compute_s"] for s, b in zip(stages[1:], base[1:]))
        hops = (pipe.rank0.timer.calls - d0_calls) * pipe.transport.world_size
        return {
            "communication_s": remote_s - remote_compute_s,
            "communication_share": (remote_s - remote_compute_s) / wall[0],
            "per_boundary_ms": 1000 * (remote_s - remote_compute_s) / hops,
            "stages": stages,
        }

    serve_turns(run_once, finish, ready={"plan": pipe.plan.spec()})
pipe.close()
