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
elif action in ("lose-idle", "lose-busy"):
    # Stage 2's process dies; this driver (a notebook kernel) must live on, fail with the
    # lost stage's name, close, and start a fresh pipeline.
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    victim = next(p for p in workers if "--rank 2" in " ".join(psutil.Process(p).cmdline()))
    if action == "lose-idle":
        psutil.Process(victim).kill()
        time.sleep(2)
    else:
        threading.Timer(1.0, lambda: psutil.Process(victim).kill()).start()
    start, error = time.monotonic(), None
    try:
        for _ in range(1000):
            pipe.model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    except torch_pp.PipelineError as exc:
        error = str(exc)
    seconds = time.monotonic() - start
    try:
        pipe.model.generate(ids, max_new_tokens=2)
        again = None
    except torch_pp.PipelineError as exc:
        again = str(exc)
    pipe.close()
    fresh = torch_pp.local_pipeline(model, stages=2, progress=False)
    usable = torch.equal(fresh.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), want)
    fresh.close()
    print(json.dumps({"error": error, "again": again, "seconds": seconds, "usable": usable}), flush=True)
