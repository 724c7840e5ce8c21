"""Start a pipeline, leave it idle longer than the liveness threshold, then generate."""

import os
import time

import torch

import torch_pp

pipe = torch_pp.start(os.sys.argv[1], progress=False)
if pipe.is_driver:
    time.sleep(float(os.environ["IDLE_S"]))
    out = pipe.model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with open(os.path.join(os.environ["OUT"], "idle.txt"), "w") as f:
        f.write("ok" if out.shape[1] == 8 else "bad")
    pipe.close()
