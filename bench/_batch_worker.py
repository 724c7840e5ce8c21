"""Run under torchrun by bench_serve.py: one greedy ``generate()`` of a batch of each size, the
baseline continuous batching is measured against (the same pipeline, the same prompts).

    _batch_worker.py MODEL NEW SIZES OUT_JSON   (SIZES: comma-separated batch sizes)
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_pp  # noqa: E402
from _common import load_tokenizer, make_inputs  # noqa: E402
from bench_serve import PROMPTS  # noqa: E402

model_dir, new, sizes, out = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")], sys.argv[4]
pipe = torch_pp.start(model_dir, dtype=os.environ.get("BENCH_DTYPE", "float32"), device=os.environ.get("BENCH_DEVICE", "cpu"),
                      progress=False)
if pipe.is_driver:
    tok = load_tokenizer(model_dir)
    figures = {}
    for size in sizes:
        inputs = {k: v.to(pipe.device) for k, v in make_inputs(tok, [PROMPTS[i % len(PROMPTS)] for i in range(size)]).items()}
        runs = []
        for rep in range(3):  # the first warms every length
            start = time.perf_counter()
            with torch.inference_mode():
                pipe.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            runs.append(size * new / (time.perf_counter() - start))
        figures[str(size)] = statistics.median(runs[1:])
    with open(out, "w") as f:
        json.dump(figures, f)
    pipe.close()
