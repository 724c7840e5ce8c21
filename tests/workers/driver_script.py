"""A driver process for test_interactive: start a local pipeline, report worker PIDs, then act."""

import json
import signal
import sys
import threading
import time

import psutil
import torch
from transformers import AutoModelForCausalLM

import torch_pp

model, action = sys.argv[1], sys.argv[2]
pipe = torch_pp.local_pipeline(model, stages=3, progress=False)
workers = [p.pid for p in psutil.Process().children()]
print(json.dumps({"workers": workers}), flush=True)
ids = torch.tensor([[1, 5, 9, 33]])
if action == "hang":
    time.sleep(600)  # the test kills this process
elif action == "interrupt":
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    want = ref.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    interrupted = False
    try:
        for _ in range(200):  # long enough that the interrupt lands mid-generation
            pipe.model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    except KeyboardInterrupt:
        interrupted = True
    got = pipe.model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    print(json.dumps({"interrupted": interrupted, "usable": torch.equal(got, want)}), flush=True)
    pipe.close()
