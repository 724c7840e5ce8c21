"""Run under torchrun (2 ranks) by bench_prefill_hop.py: a prefill's hidden state from rank 0's device to
rank 1's, taken apart: the copy out, a host copy of the same bytes (framing), Gloo's send and the copy
in, the device copies with pageable and (CUDA) pinned host memory alternating, medians. Nothing of
torch_pp's: the floor under its prefill hop.

    _prefill_hop_worker.py DEVICE DTYPE HIDDEN LENGTHS REPS OUT_JSON
"""

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from torch_pp.devices import synchronize
from torch_pp.dtypes import to_torch

device, dtype, hidden = torch.device(sys.argv[1]), to_torch(sys.argv[2]), int(sys.argv[3])
lengths, reps, out = [int(n) for n in sys.argv[4].split(",")], int(sys.argv[5]), sys.argv[6]
dist.init_process_group("gloo")
rank = dist.get_rank()
if device.type == "cuda" and device.index is None:  # each rank its own GPU where there are two, else both share one
    device = torch.device("cuda", rank % torch.cuda.device_count())
pinned = device.type == "cuda"  # page-locked host memory is CUDA's (MPS shares memory, a CPU copies nothing)
ack = torch.zeros(1, dtype=torch.uint8)


def timed(fn) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start)


figures = {}
for length in lengths:
    shape = (1, length, hidden)
    on_device = torch.randn(shape, device=device).to(dtype)
    kinds = ["pageable", "pinned"] if pinned else ["pageable"]
    host = {k: torch.empty(shape, dtype=dtype, pin_memory=k == "pinned") for k in kinds}
    framed = torch.empty(shape, dtype=dtype)
    buffer = host["pageable"].view(torch.uint8).view(-1)  # what Gloo sends and receives
    laps = {f"{what}_{k}": [] for what in ("out", "in") for k in kinds}
    laps["gloo"], laps["host_copy"] = [], []
    for rep in range(reps + 1):  # the first round warms every copy and the connection
        for k in kinds if rep % 2 else kinds[::-1]:
            if device.type == "cpu":
                laps[f"out_{k}"].append(0.0)  # a CPU rank sends from where the tensor lies
                laps[f"in_{k}"].append(0.0)
            else:
                laps[f"out_{k}"].append(timed(lambda: host[k].copy_(on_device)))
                laps[f"in_{k}"].append(timed(lambda: on_device.copy_(host[k])))
        laps["host_copy"].append(timed(lambda: framed.copy_(host["pageable"])))
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:  # one way: the send, then a one-byte answer once rank 1 has it all
            dist.send(buffer, 1)
            dist.recv(ack, 1)
        else:
            dist.recv(buffer, 0)
            dist.send(ack, 0)
        laps["gloo"].append(1000 * (time.perf_counter() - start))
    row = {key: statistics.median(v[1:]) for key, v in laps.items()}
    row["megabytes"] = on_device.nbytes / 1e6
    figures[str(length)] = row
if rank == 0:
    with open(out, "w") as f:
        json.dump({"device": str(device), "dtype": sys.argv[2], "hidden": hidden, "reps": reps, "pinned": pinned,
                   "figures": figures}, f)
dist.destroy_process_group()
