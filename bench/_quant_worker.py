"""Run under torchrun by bench_quant.py: one 2-stage pipeline in one quantization mode.

    _quant_worker.py MODEL_DIR MODE LONG_TOKENS NEW_TOKENS     (MODE: none, int8 or int4)

Rank 0 answers the orchestrator's turns (see ``_common.serve_turns``): each turn times a greedy
decode from a short prompt and the first token of a LONG_TOKENS prompt; the last reports every
stage's weight bytes and peak memory.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_pp  # noqa: E402
from _common import load_tokenizer, long_inputs, make_inputs, serve_turns, timed_generate  # noqa: E402

model_dir, mode, long_tokens, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
device, dtype = os.environ.get("BENCH_DEVICE", "cpu"), os.environ.get("BENCH_DTYPE", "float32")
pipe = torch_pp.start(model_dir, dtype=dtype, device=device, progress=False, quantize=None if mode == "none" else mode)
if pipe.is_driver:
    tok = load_tokenizer(model_dir)
    short = {k: v.to(pipe.device) for k, v in make_inputs(tok, "Tell me about the history of computing.").items()}
    long = {k: v.to(pipe.device) for k, v in long_inputs(tok, long_tokens).items()}

    def run_once() -> dict:
        decode = timed_generate(pipe.model, short, new_tokens=new_tokens)
        first = timed_generate(pipe.model, long, new_tokens=1)
        return {"decode_tokens_per_s": decode["decode_tokens_per_s"], "ttft_s": first["ttft_s"], "tokens": decode["tokens"]}

    run_once()  # warm every length once (cuDNN plans an attention kernel per new length)

    def finish() -> dict:
        return {"stages": [{k: s[k] for k in ("rank", "layers", "device", "dtype", "weight_bytes", "peak_memory_bytes")}
                           for s in pipe.stats()]}

    serve_turns(run_once, finish)
pipe.close()
