"""Decode time per token over simulated links: what each stage boundary adds beyond the link itself.

Embedded SmolLM2-135M-Instruct, CPU, fp32, one thread per process, 2 and 3 stages, with
the transport's simulated 10GbE and Thunderbolt 4 links (TORCH_PP_SIM_LINK) and with the
plain loopback. For each: decode tokens/s, ms per token, communication per boundary, and the
time per boundary beyond what the simulated link itself costs (latency + frame transfer), and
how much of that the bare Gloo hop costs on this machine when the ranks work as long as the
stages do (on a VM a sleeping process wakes slowly: the longer it slept, the slower).

    python bench/bench_links.py [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, dump, gloo_floor, median_of, print_table, torchrun_cmd  # noqa: E402
from bench_decode import PROMPT  # noqa: E402

from torch_pp.net.link import SimulatedLink  # noqa: E402
from torch_pp.options import Settings  # noqa: E402

FRAME_BYTES = Settings.from_env().frame_bytes


def run_pipeline(model_dir: str, stages: int, link: str | None, new_tokens: int, reps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_PP_SIM_LINK", None)
    if link:
        env["TORCH_PP_SIM_LINK"] = link
    worker = TurnWorker(torchrun_cmd(stages, HERE / "_pipeline_worker.py", model_dir, PROMPT, new_tokens), env)
    runs = [worker.ask("run") for _ in range(reps)]
    return {**worker.close(), "ttft_s": median_of(runs, "ttft_s"), "decode_tokens_per_s": median_of(runs, "decode_tokens_per_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    from torch_pp.default_model import ensure_default_model

    model_dir = args.model or str(ensure_default_model())
    rows, results = [], []
    for stages in (2, 3):
        floor = None
        for link in (None, "10gbe", "tb4"):
            r = run_pipeline(model_dir, stages, link, args.new_tokens, args.reps)
            if floor is None:  # raw Gloo with each rank busy as long as a stage is, on loopback
                floor = gloo_floor(stages, 1000 / r["decode_tokens_per_s"] / stages)
            sim = SimulatedLink.from_spec(link)
            # A decode step's message is one frame: the link's own cost for it.
            link_ms = 1000 * (sim.latency_s + FRAME_BYTES * 8 / (sim.gbit_per_s * 1e9)) if sim else 0.0
            added = r["per_boundary_ms"] - link_ms
            results.append({"stages": stages, "link": link or "loopback", "decode_tokens_per_s": r["decode_tokens_per_s"],
                            "ms_per_token": 1000 / r["decode_tokens_per_s"], "ttft_s": r["ttft_s"],
                            "comm_per_boundary_ms": r["per_boundary_ms"], "simulated_link_ms": link_ms,
                            "added_per_boundary_ms": added, "raw_gloo_hop_ms": floor, "ours_per_boundary_ms": added - floor,
                            "communication_share": r["communication_share"]})
            rows.append([str(stages), link or "loopback", f"{r['decode_tokens_per_s']:.2f}", f"{1000 / r['decode_tokens_per_s']:.1f}",
                         f"{r['per_boundary_ms']:.3f}", f"{link_ms:.3f}", f"{added:.3f}", f"{floor:.3f}", f"{added - floor:.3f}",
                         f"{100 * r['communication_share']:.1f}%"])
    dump({"model": model_dir, "frame_bytes": FRAME_BYTES, "runs": results}, args.json)
    print()
    print_table(rows, ["stages", "link", "tok/s", "ms/token", "comm/boundary ms", "link itself ms", "added ms (goal <= 0.3)",
                       "raw Gloo hop ms", "torch_pp's own ms", "comm share"])
    print("\nadded = per-boundary communication beyond the simulated link; raw Gloo hop = the same ring over bare "
          "dist.send/recv with each rank busy as long as a stage (the machine's floor); torch_pp's own = added - raw Gloo hop")


if __name__ == "__main__":
    main()
