"""bench_loading.py's worker: a pipeline stage's load (under torchrun), or HF's from_pretrained (--hf)."""

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from torch_pp.devices import peak_rss_bytes as peak


folder, out = Path(sys.argv[1]), Path(sys.argv[2])
if "--hf" in sys.argv:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    (out / "hf.json").write_text(json.dumps({"peak_rss_bytes": peak(), "load_s": time.perf_counter() - start}))
    sys.exit(0)

import torch_pp  # noqa: E402
from torch_pp.model.loading import weight_map  # noqa: E402
from torch_pp.model.reader import SafetensorsReader  # noqa: E402
from torch_pp.placement.config import read_config  # noqa: E402
from torch_pp.placement.plan import even_plan  # noqa: E402

torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
plan = even_plan(num_layers=read_config(folder).num_hidden_layers, num_stages=world)
start_l, end_l = plan.ranges[rank]


def mine(key: str) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return start_l <= int(m.group(1)) < end_l if m else rank == 0


# The plain read first, on both ranks at once (the same contention as the load): this rank's
# tensors, from the same files, each into a fresh buffer that is dropped at once.
wm = weight_map(folder)
t0 = time.perf_counter()
for fname in sorted({f for k, f in wm.items() if mine(k)}):
    with SafetensorsReader(folder / fname) as f:
        for key in f.header:
            if mine(key):
                f.read(key)
read_s = time.perf_counter() - t0
before = peak()
t0 = time.perf_counter()
pipe = torch_pp.start(folder, progress=False, balance="even", device="cpu", dtype="float32")
start_s = time.perf_counter() - t0
(out / f"load{pipe.rank}.json").write_text(json.dumps(
    {"rank": pipe.rank, "share_bytes": pipe.stage.weight_bytes, "peak_rss_bytes": peak(), "peak_before_load_bytes": before,
     "load_s": pipe.load_s, "start_s": start_s, "read_s": read_s}))
if pipe.is_driver:
    pipe.close()
