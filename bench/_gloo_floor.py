"""Run under torchrun by bench_links.py: the cost of one ring hop over raw Gloo, nothing of ours.

Every rank in turn works (spins) for ``work_ms`` and sends a frame-sized message to the next
rank, as the stages of a decoding pipeline do; rank 0 reports the time per hop beyond the work.
On a VM the hop grows with how long the receiver slept, so the work matches the real stages'.

    _gloo_floor.py WORK_MS ROUNDS OUT_JSON
"""

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from torch_pp.options import Settings

work_ms, rounds, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
nxt, prev = (rank + 1) % world, (rank - 1) % world
FRAME_BYTES = Settings.from_env().frame_bytes
frame, inbox = torch.zeros(FRAME_BYTES, dtype=torch.uint8), torch.zeros(FRAME_BYTES, dtype=torch.uint8)


def work() -> None:
    end = time.perf_counter() + work_ms / 1000
    while time.perf_counter() < end:
        pass


laps = []
for _ in range(rounds):
    if rank == 0:
        start = time.perf_counter()
        work()
        dist.send(frame, nxt)
        dist.recv(inbox, prev)
        laps.append(time.perf_counter() - start)
    else:
        dist.recv(inbox, prev)
        work()
        dist.send(frame, nxt)
if rank == 0:
    per_hop = (statistics.median(laps[2:]) - world * work_ms / 1000) / world
    with open(out, "w") as f:
        json.dump({"work_ms": work_ms, "per_hop_ms": 1000 * per_hop}, f)
dist.destroy_process_group()
