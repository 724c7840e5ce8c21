"""Lanes benchmark: a greedy batch in L lanes against the same batch in one lane, same run.

A lane is a sub-batch in flight on its own, so that stage 0 works on one while stage 1 works
on another. What lanes can gain depends on the hardware: every stage runs each sub-batch
separately, so a step of B/L sequences must cost well under a step of B for splitting to pay.
Where decode is bound by reading the weights (small batches on a CPU in float32, any small
batch on a GPU), a half batch costs nearly a full one and lanes cannot help; where compute grows
with the batch (a CPU without bf16 instructions in bfloat16, large batches), they approach L×
with L balanced stages.

What is compared is decoding: each figure is the wall-time difference between a short and a
long generation of the same batch (``--tokens 8,40``), so the prompts' prefill and the call's
fixed costs cancel out, as in ``bench_decode``. Next to the measured speed-up the benchmark
reports the bound this machine allows, from the stages' own compute in the same runs:

    bound = round time (1 lane) / max over stages of compute per round (L lanes)

(every stage busy all the time, nothing else costing anything), and rank 0's CPU seconds per
decode round for each lane count (lanes must not make rank 0's own work grow faster than the
number of lanes: one thread at a time does device work, see ``rank0.turn.DeviceTurn``).

Runs alternate (1 lane, L lanes, L lanes, 1 lane, ...) after a warm-up; medians are reported.

    python bench/bench_lanes.py [--batches 8,64] [--lanes 2] [--tokens 8,40] [--reps 3] [--balance compute] [--dtype bfloat16]
        [--split-head auto|on|off]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, dump, print_table, torchrun_cmd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--tokens", default="8,40", help="new tokens of the short and the long run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32",
                    help="float32, or bfloat16 (on a CPU without bf16 instructions, compute-bound)")
    ap.add_argument("--balance", default="compute", help="compute, memory, even, or a manual plan such as 0:12,12:30")
    ap.add_argument("--split-head", choices=["auto", "on", "off"], default="auto",
                    help="the LM head split between rank 0 and the last stage (auto: start()'s default)")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()

    from torch_pp.default_model import ensure_default_model

    model_dir = args.model or str(ensure_default_model())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = TurnWorker(torchrun_cmd(args.stages, HERE / "_lanes_worker.py", model_dir, args.balance, args.dtype, args.split_head), env)
    result = {"model": model_dir, "stages": args.stages, "lanes": args.lanes, "tokens": args.tokens,
              "reps": args.reps, "balance": args.balance, "dtype": args.dtype, "split_head": args.split_head, "batches": {}}
    short, long = map(int, args.tokens.split(","))
    for batch in map(int, args.batches.split(",")):
        def decode(lanes: int) -> dict:
            """One short and one long run of the batch: the figures of the rounds between them."""
            a, b = (worker.ask(f'run {{"batch": {batch}, "lanes": {lanes}, "new": {n}}}') for n in (short, long))
            rounds, wall = long - short, b["wall_s"] - a["wall_s"]
            return {"round_s": wall / rounds, "tokens_per_s": batch * rounds / wall,
                    "rank0_cpu_ms_per_round": 1000 * (b["rank0_cpu_s"] - a["rank0_cpu_s"]) / rounds,
                    "stage_compute_s_per_round": [(y - x) / rounds for x, y in zip(a["stage_compute_s"], b["stage_compute_s"])],
                    "tokens": b["tokens"]}

        decode(1), decode(args.lanes)  # warm-up: every length once
        runs = {1: [], args.lanes: []}
        for i in range(args.reps):
            for lanes in (1, args.lanes) if i % 2 == 0 else (args.lanes, 1):
                runs[lanes].append(decode(lanes))
        one, many = runs[1], runs[args.lanes]
        row = {
            "tokens_per_s_1_lane": statistics.median(r["tokens_per_s"] for r in one),
            f"tokens_per_s_{args.lanes}_lanes": statistics.median(r["tokens_per_s"] for r in many),
            "speedup": statistics.median(m["tokens_per_s"] / o["tokens_per_s"] for o, m in zip(one, many)),
            "bound": statistics.median(o["round_s"] / max(m["stage_compute_s_per_round"]) for o, m in zip(one, many)),
            "rank0_cpu_ms_per_round_1_lane": statistics.median(r["rank0_cpu_ms_per_round"] for r in one),
            f"rank0_cpu_ms_per_round_{args.lanes}_lanes": statistics.median(r["rank0_cpu_ms_per_round"] for r in many),
            "stage_compute_ms_per_round_1_lane": [round(1000 * c, 2) for c in one[0]["stage_compute_s_per_round"]],
            f"stage_compute_ms_per_round_{args.lanes}_lanes": [round(1000 * c, 2) for c in many[0]["stage_compute_s_per_round"]],
            "speedups": [m["tokens_per_s"] / o["tokens_per_s"] for o, m in zip(one, many)],
            "same_tokens": all(o["tokens"] == m["tokens"] for o, m in zip(one, many)),
        }
        row["efficiency"] = row["speedup"] / row["bound"]
        result["batches"][batch] = row
    worker.close()
    dump(result, args.json)
    print()
    L = args.lanes
    print_table([[str(b), f"{r['tokens_per_s_1_lane']:.1f}", f"{r[f'tokens_per_s_{L}_lanes']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['bound']:.2f}x", f"{r['rank0_cpu_ms_per_round_1_lane']:.0f} / {r[f'rank0_cpu_ms_per_round_{L}_lanes']:.0f}",
                  str(r["same_tokens"])] for b, r in result["batches"].items()],
                ["batch", "1 lane tok/s", f"{L} lanes tok/s", "speed-up", "bound here", "rank-0 CPU ms/round", "same tokens"])


if __name__ == "__main__":
    main()
