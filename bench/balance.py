"""Measure where each stage's time goes per decode step and print the plan that evens them out.

Run it under the same launch as generation (one machine or several), with the batch size you
mean to serve, e.g.

    torchrun --nproc-per-node 2 bench/balance.py [--model DIR] [--batch 8] [--device cuda]

then start with the printed ``layers=`` (``--layers`` on the command line). With several lanes
or concurrent requests the most occupied stage sets the pace, and only the machines can say
what occupies each one: rank 0 also embeds, runs the LM head and generate()'s bookkeeping, and
two machines rarely run a layer equally fast. The plan comes from ``Pipeline.balanced_plan``
over the decode steps between a short and a long greedy run of the batch, in one lane (the
prompts' prefill is outside that window), the median of ``--rounds`` such pairs. Prints JSON
and a table: each stage's layers, its measured occupied and in-layer milliseconds per step,
and the same for the proposed plan as the measured rates predict them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import dump, load_tokenizer, make_inputs, print_table  # noqa: E402

import torch  # noqa: E402

import torch_pp  # noqa: E402
from torch_pp import perf  # noqa: E402
from torch_pp.options import BALANCES  # noqa: E402
from torch_pp.placement.config import read_config  # noqa: E402
from torch_pp.placement.balance import measured_plan, predicted_times  # noqa: E402
from torch_pp.placement.sizing import model_sizes  # noqa: E402
from torch_pp.trace import now  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps measured")
    ap.add_argument("--rounds", type=int, default=3, help="short/long pairs measured; each figure is their median")
    ap.add_argument("--layers", help="the plan to measure under (default: --balance's)")
    ap.add_argument("--balance", default="compute", choices=BALANCES)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--start", default="{}", help="more torch_pp.start() options, as JSON")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    pipe = torch_pp.start(args.model, layers=args.layers, balance=args.balance, device=args.device, dtype=args.dtype,
                          progress=False, **json.loads(args.start))
    if not pipe.is_driver:
        return
    if pipe.transport.world_size == 1:
        pipe.close()
        raise SystemExit("balance.py: one stage holds every layer, so there is nothing to balance; launch it with as many "
                         "processes as the pipeline has stages (torchrun --nproc-per-node N, or one per machine)")
    try:
        tok = load_tokenizer(pipe.model_dir)
        inputs = {k: v.to(pipe.model.device) for k, v in
                  make_inputs(tok, [f"Tell me something about topic number {i}." for i in range(args.batch)]).items()}
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0

        def generate(new: int) -> None:
            with torch.inference_mode():
                pipe.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)

        generate(args.tokens + 2)  # warm-up: every length the measured run reaches
        rounds = []
        for _ in range(args.rounds):
            # The window: the decode steps a long run makes beyond a short one (its prefill is in both).
            t0 = now()
            generate(2)
            t1 = now()
            generate(args.tokens + 2)
            t2 = now()
            short = perf.breakdown(pipe.stats(spans_since=t0), start=t0, end=t1)
            long = perf.breakdown(pipe.stats(spans_since=t1), start=t1, end=t2)
            rounds.append({key: [max(0.0, b[key] - a[key]) / args.tokens for a, b in zip(short, long)]
                           for key in ("occupied_s", "layers_s")})
        # The median round per stage and figure: one stage descheduled once (another program on the
        # machine) must not move the plan.
        per_step = {key: [statistics.median(stage) for stage in zip(*(r[key] for r in rounds))]
                    for key in ("occupied_s", "layers_s")}
        sizes = model_sizes(read_config(pipe.model_dir))
        plan = measured_plan(sizes, pipe.plan, **per_step)
        predictions = predicted_times(sizes, pipe.plan, plan, **per_step)
        rows, stages = [], []
        for r, ((a, b), (c, d), predicted) in enumerate(zip(pipe.plan.ranges, plan.ranges, predictions)):
            occupied, layers = per_step["occupied_s"][r], per_step["layers_s"][r]
            stages.append({"rank": r, "layers": [a, b], "occupied_ms": 1000 * occupied, "layers_ms": 1000 * layers,
                           "proposed_layers": [c, d], "predicted_ms": 1000 * predicted})
            rows.append([str(r), f"{a}:{b}", f"{1000 * occupied:.2f}", f"{1000 * layers:.2f}", f"{c}:{d}", f"{1000 * predicted:.2f}"])
        result = {"model": str(pipe.model_dir), "batch": args.batch, "tokens": args.tokens, "rounds": args.rounds, "plan": pipe.plan.spec(),
                  "balanced_plan": plan.spec(), "stages": stages}
        dump(result, args.json)
        print()
        print_table(rows, ["stage", "layers", "occupied ms/step", "in layers ms/step", "proposed", "predicted ms/step"])
        print(f"\nstart with layers={plan.spec()!r} (--layers {plan.spec()})")
    finally:
        pipe.close()


if __name__ == "__main__":
    main()
