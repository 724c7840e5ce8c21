"""Single-process transformers baseline for bench_decode.py (one thread; CPU or CUDA).

Loads the model, then answers the orchestrator's turns (see ``_common.serve_turns``).
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_tokenizer, make_inputs, serve_turns, timed_generate  # noqa: E402

from torch_pp.devices import peak_rss_bytes  # noqa: E402

model_dir, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
DEVICE, DTYPE = os.environ.get("BENCH_DEVICE", "cpu"), os.environ.get("BENCH_DTYPE", "float32")

tok = load_tokenizer(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).to(DEVICE).eval()
inputs = {k: v.to(DEVICE) for k, v in make_inputs(tok, prompt).items()}
timed_generate(model, inputs, new_tokens=4)  # warm-up


def peak() -> int:
    if DEVICE.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return peak_rss_bytes()


serve_turns(lambda spec=None: timed_generate(model, inputs, new_tokens=(spec or {}).get("new_tokens", new_tokens)),
            lambda: {"peak_memory_bytes": peak()})
