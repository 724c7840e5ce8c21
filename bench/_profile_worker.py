"""One torchrun worker of ``profile_ranks.py``: start the pipeline, warm it, then time one greedy stream
while py-spy samples every rank's process (rank 0 starts one py-spy per rank of this machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

import torch_pp
from torch_pp.devices import synchronize

MODEL, OUT, NEW, RATE = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def main() -> None:
    torch.set_num_threads(1)
    pipe = torch_pp.start(MODEL, dtype=os.environ.get("BENCH_DTYPE"), device=os.environ.get("BENCH_DEVICE"), progress=False,
                          **json.loads(os.environ.get("BENCH_START", "{}")))
    if not pipe.is_driver:
        return  # a stage serves until rank 0 closes the pipeline
    vocab = pipe.model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), min(1000, vocab), (1, 32), generator=torch.Generator().manual_seed(0)).to(pipe.device)

    def stream() -> float:  # not ``_common.timed_generate``: its streamer's per-token work would be sampled too
        synchronize(pipe.device)
        start = time.perf_counter()
        pipe.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        synchronize(pipe.device)
        return time.perf_counter() - start

    stream()  # every KV length (and on CUDA every captured bucket) once
    wall = stream()
    # This machine's ranks: rank 0 and its sibling workers under the same torchrun agent.
    siblings = subprocess.run(["pgrep", "-P", str(os.getppid())], capture_output=True, text=True).stdout.split()
    pids = [os.getpid(), *sorted(int(p) for p in siblings if int(p) != os.getpid())]
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    # Streams run slower under py-spy than ``wall``: a window of about three, so that at least two fit
    # whole (``int(2 * wall)`` once left half a second for a 0.7 s stream on a loaded VM: none fit).
    seconds = max(2, math.ceil(3 * wall + 1))  # whole samples of steps, never start-up
    spies = [subprocess.Popen([spy if os.path.exists(spy) else "py-spy", "record", "--pid", str(pid), "--rate", str(RATE),
                               "--duration", str(seconds), "--idle", "--format", "raw", "-o", os.path.join(OUT, f"rank{r}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r, pid in enumerate(pids)]
    time.sleep(0.5)  # py-spy attached
    walls = []
    deadline = time.monotonic() + seconds - 0.5
    while time.monotonic() + 1.5 * wall < deadline:
        walls.append(stream())
    errors = [s.communicate()[1] for s in spies]
    failed = [f"rank {r}: {e.strip()[-300:]}" for r, (s, e) in enumerate(zip(spies, errors)) if s.returncode]
    with open(os.path.join(OUT, "run.json"), "w") as f:
        json.dump({"ranks": len(pids), "seconds": seconds, "streams": len(walls), "new_tokens": NEW, "rate": RATE,
                   "wall_s": walls, "failed": failed}, f)
    pipe.close()


if __name__ == "__main__":
    main()
