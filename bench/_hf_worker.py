"""Single-process transformers baseline for bench_decode.py (one thread, fp32, CPU)."""

import json
import os
import resource
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from _common import make_inputs, median_of, timed_generate  # noqa: E402

model_dir, prompt, new_tokens, reps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
DEVICE, DTYPE = os.environ.get("BENCH_DEVICE", "cpu"), os.environ.get("BENCH_DTYPE", "float32")

tok = AutoTokenizer.from_pretrained(model_dir) if os.path.exists(os.path.join(model_dir, "tokenizer.json")) else None
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).to(DEVICE).eval()
inputs = {k: v.to(DEVICE) for k, v in make_inputs(tok, prompt).items()}
timed_generate(model, inputs, new_tokens=4)
runs = [timed_generate(model, inputs, new_tokens=new_tokens) for _ in range(reps)]
with open(out, "w") as f:
    json.dump({
        "ttft_s": median_of(runs, "ttft_s"),
        "decode_tokens_per_s": median_of(runs, "decode_tokens_per_s"),
        "tokens": runs[-1]["tokens"],
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if DEVICE.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }, f)
