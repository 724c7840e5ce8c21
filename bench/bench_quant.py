"""Quantization's cost and gain: a 2-stage pipeline unquantized, int8 and int4, in one run.

    python bench/bench_quant.py [--model DIR] [--device cpu|cuda|mps] [--dtype float32] [--rounds 3]
                                [--long 512] [--new 48] [--json out.json]

Each mode runs in its own 2-rank pipeline (the embedded SmolLM2 by default, any folder with
``--model``); their timed turns alternate, round after round, and medians are reported:
decode tokens/s from a short prompt, time to first token of a ``--long``-token prompt, each
stage's weight bytes and peak memory, and the greedy tokens' agreement with the unquantized
run (quantization may change them; how much it costs in quality is tests/test_quant.py's
perplexity check).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, alternate, dump, print_table, torchrun_cmd  # noqa: E402

MODES = ("none", "int8", "int4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=512, help="prompt tokens for the time to first token")
    parser.add_argument("--new", type=int, default=48, help="decoded tokens per turn")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.model is None:
        from torch_pp.default_model import ensure_default_model

        args.model = str(ensure_default_model(progress=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DEVICE": args.device, "BENCH_DTYPE": args.dtype}
    workers = {}
    try:
        for mode in MODES:  # one at a time: loading alongside another's warm-up would slow both
            workers[mode] = TurnWorker(torchrun_cmd(2, HERE / "_quant_worker.py", args.model, mode, args.long, args.new), env)
        runs = alternate(workers, args.rounds)
        finals = {m: w.close() for m, w in workers.items()}
    finally:
        for w in workers.values():
            w.proc.kill()
    base_tokens = runs["none"][0]["tokens"]
    figures = {}
    for mode in MODES:
        stages = finals[mode]["stages"]
        figures[mode] = {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs[mode]),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs[mode]),
            "weight_bytes": [s["weight_bytes"] for s in stages],
            "peak_memory_bytes": [s["peak_memory_bytes"] for s in stages],
            "same_tokens_as_unquantized": runs[mode][0]["tokens"] == base_tokens,
        }
    for mode in MODES[1:]:
        figures[mode]["decode_vs_unquantized"] = figures[mode]["decode_tokens_per_s"] / figures["none"]["decode_tokens_per_s"]
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "rounds": args.rounds, "long": args.long,
              "new": args.new, "figures": figures}
    dump(result, args.json)
    gib = 2**30
    print_table([[m, f"{f['decode_tokens_per_s']:.1f}", f"{1000 * f['ttft_s']:.0f}",
                  " / ".join(f"{b / gib:.2f}" for b in f["weight_bytes"]),
                  " / ".join(f"{b / gib:.2f}" for b in f["peak_memory_bytes"]),
                  "yes" if f["same_tokens_as_unquantized"] else "no"] for m, f in figures.items()],
                ["mode", "decode tok/s", f"TTFT {args.long} tok, ms", "weights per stage, GiB", "peak per stage, GiB",
                 "same tokens"])


if __name__ == "__main__":
    main()
