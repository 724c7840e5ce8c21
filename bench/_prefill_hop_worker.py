"""Run under torchrun (2 ranks) by bench_prefill_hop.py: a prefill's hidden state from rank 0's device to
rank 1's, taken apart: the copy out, a host copy of the same bytes (framing), Gloo's send and the copy
in, the device copies with pageable and (CUDA) pinned host memory alternating, medians: the floor
under a prefill's hop. Then torch_pp's own hop of the same tensor over the same Gloo group (rank 0's
``Outbox``, the link's framing into its kept buffers, the stage's kept receive and ``Inbox``), one way.

    _prefill_hop_worker.py DEVICE DTYPE HIDDEN LENGTHS REPS OUT_JSON
"""

import json
import statistics
import sys
import time

import torch

from torch_pp.devices import synchronize
from torch_pp.devices.copies import Inbox, host_buffer
from torch_pp.dtypes import to_torch
from torch_pp.net.transport import Transport
from torch_pp.net.wire import Message, Op
from torch_pp.rank0.outbox import Outbox

device, dtype, hidden = torch.device(sys.argv[1]), to_torch(sys.argv[2]), int(sys.argv[3])
lengths, reps, out = [int(n) for n in sys.argv[4].split(",")], int(sys.argv[5]), sys.argv[6]
link = Transport.from_env()
rank, group = link.rank, link._link.group  # the bare sends go over torch_pp's own Gloo group
if device.type == "cuda" and device.index is None:  # each rank its own GPU where there are two, else both share one
    device = torch.device("cuda", rank % torch.cuda.device_count())
pinned = device.type == "cuda"  # page-locked host memory is CUDA's (MPS shares memory, a CPU copies nothing)
ack = torch.zeros(1, dtype=torch.uint8)
link.keep_host_memory(lambda nbytes: host_buffer(nbytes, device))
outbox, inbox = Outbox(device), Inbox(device)


def barrier() -> None:
    if rank == 0:
        group.recv([ack], 1, 0).wait()
    else:
        group.send([ack], 0, 0).wait()


def answer() -> None:
    """Rank 1 tells rank 0 it has everything (a one-byte send): the end of a one-way hop."""
    if rank == 0:
        group.recv([ack], 1, 0).wait()
    else:
        group.send([ack], 0, 0).wait()


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
    laps["gloo"], laps["host_copy"], laps["torch_pp"] = [], [], []
    for rep in range(reps + 1):  # the first round warms every copy and the connection
        for k in kinds if rep % 2 else kinds[::-1]:
            if device.type == "cpu":
                laps[f"out_{k}"].append(0.0)  # a CPU rank sends from where the tensor lies
                laps[f"in_{k}"].append(0.0)
            else:
                laps[f"out_{k}"].append(timed(lambda: host[k].copy_(on_device)))
                laps[f"in_{k}"].append(timed(lambda: on_device.copy_(host[k])))
        laps["host_copy"].append(timed(lambda: framed.copy_(host["pageable"])))
        barrier()
        start = time.perf_counter()
        if rank == 0:  # one way: the send, then a one-byte answer once rank 1 has it all
            group.send([buffer], 1, 0).wait()
        else:
            group.recv([buffer], 0, 0).wait()
        answer()
        laps["gloo"].append(1000 * (time.perf_counter() - start))
        barrier()
        synchronize(device)
        start = time.perf_counter()
        if rank == 0:  # torch_pp's hop: device -> kept host memory -> frame -> Gloo -> kept buffer -> device
            link.send(Message(Op.FORWARD, {"length": length}, outbox.stage([on_device])), dst=1)
        else:
            inbox.place(link.recv(src=0, kept=True))
            synchronize(device)
        answer()
        laps["torch_pp"].append(1000 * (time.perf_counter() - start))
    row = {key: statistics.median(v[1:]) for key, v in laps.items()}
    row["megabytes"] = on_device.nbytes / 1e6
    figures[str(length)] = row
if rank == 0:
    with open(out, "w") as f:
        json.dump({"device": str(device), "dtype": sys.argv[2], "hidden": hidden, "reps": reps, "pinned": pinned,
                   "figures": figures}, f)
link.close()
