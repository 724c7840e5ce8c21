"""bench_loading.py's worker: a pipeline stage's load (under torchrun), or HF's from_pretrained (--hf)."""

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


folder, out = Path(sys.argv[1]), Path(sys.argv[2])
if "--hf" in sys.argv:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    (out / "hf.json").write_text(json.dumps({"peak_rss_bytes": peak(), "load_s": time.perf_counter() - start}))
    sys.exit(0)

import torch_pp  # noqa: E402
from torch_pp.loading import weight_map  # noqa: E402

torch.set_num_threads(1)
start = time.perf_counter()
pipe = torch_pp.start(folder, progress=False, balance="even", device="cpu", dtype="float32")
load_s = time.perf_counter() - start
share = pipe.stage.weight_bytes
# The plain read: the same tensors' bytes, read from the same files into one reused buffer.
from torch_pp.loading import SafetensorsReader  # noqa: E402

names = {n for n, _ in pipe.stage.model.named_parameters()}
wm = weight_map(folder)
start = time.perf_counter()
for fname in sorted({wm[n] for n in names if n in wm}):
    with SafetensorsReader(folder / fname) as f:
        for key in f.header:
            if key in names:
                f.read(key)
read_s = time.perf_counter() - start
(out / f"load{pipe.rank}.json").write_text(json.dumps(
    {"rank": pipe.rank, "share_bytes": share, "peak_rss_bytes": peak(), "load_s": load_s, "read_s": read_s}))
if pipe.is_driver:
    pipe.close()
