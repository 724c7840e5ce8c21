"""Load a pipeline stage and report the peak RSS it added over the process's baseline."""

import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import torch_pp
from torch_pp.devices import peak_rss_bytes as peak_rss


model_dir = sys.argv[1]
with torch.device("meta"):  # warm the imports and model classes, so the baseline holds them
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
baseline = peak_rss()
pipe = torch_pp.start(model_dir, progress=False, balance="even", quantize=os.environ.get("QUANTIZE") or None)
report = {"rank": pipe.rank, "baseline": baseline, "peak": peak_rss(), "share": pipe.stage.weight_bytes,
          "head_rows": pipe.describe().get("head_rows", 0)}
with open(os.path.join(os.environ["OUT"], f"rss{pipe.rank}.json"), "w") as f:
    json.dump(report, f)
if pipe.is_driver:
    pipe.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    pipe.close()
