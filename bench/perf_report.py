"""The performance report: the write-up's table for any model and cluster.

Run it under the same launch as generation (one machine or several), e.g.

    torchrun --nproc-per-node 2 bench/perf_report.py [--model DIR] [--out bench/results]
    bash launch/node.sh ... -- ... (use `python -m torch.distributed.run ... bench/perf_report.py` on each machine)

Reports decode tokens/s (one stream), time to first token for a short and a long prompt
(pipelined and unchunked prefill), peak memory per stage, and each stage's time split into
compute / communication / idle during decoding. Writes JSON, a human table, a Chrome/Perfetto
trace and a PNG timeline. Where the model fits one process, single-process transformers
generate() runs as the baseline in the same invocation (on rank 0, after the pipeline closes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import load_tokenizer, long_inputs, make_inputs, print_table, timed_generate  # noqa: E402

import torch_pp  # noqa: E402
import torch_pp.devices  # noqa: E402
from torch_pp import perf  # noqa: E402
from torch_pp.options import BALANCES  # noqa: E402
from torch_pp.trace import now  # noqa: E402

LONG = 1024


def prompts(tok, long: int):
    return make_inputs(tok, "Say hello."), long_inputs(tok, long)


def ttft(model, inputs) -> float:
    return timed_generate(model, inputs, new_tokens=1)["ttft_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--long", type=int, default=LONG, help="the long prompt's length in tokens")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--layers", help="manual plan, e.g. 0:11,11:30 (overrides --balance)")
    ap.add_argument("--balance", default="memory", choices=BALANCES, help="placement when --layers is not given")
    args = ap.parse_args()
    pipe = torch_pp.start(args.model, progress=False, layers=args.layers, balance=args.balance)
    if not pipe.is_driver:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(pipe.model_dir)
    short, long = prompts(tok, args.long)
    model = pipe.model
    timed_generate(model, short, new_tokens=4)  # warm-up
    result = {"model": str(pipe.model_dir), "stages": pipe.plan.num_stages, "plan": pipe.plan.spec()}
    result["ttft_short_s"] = min(ttft(model, short) for _ in range(3))
    model.prefill_chunk = 0
    result["ttft_long_unchunked_s"] = min(ttft(model, long) for _ in range(2))
    model.prefill_chunk = None
    result["ttft_long_pipelined_s"] = min(ttft(model, long) for _ in range(2))
    result["prefill_speedup"] = result["ttft_long_unchunked_s"] / result["ttft_long_pipelined_s"]
    t0 = now()
    decode = timed_generate(model, short, new_tokens=args.new_tokens)
    t1 = now()
    stages = pipe.stats(spans_since=t0)
    result["decode_tokens_per_s"] = decode["decode_tokens_per_s"]
    result["breakdown"] = perf.breakdown(stages, start=t0, end=t1)
    result["stages_memory"] = [{k: s[k] for k in ("rank", "host", "layers", "device", "dtype", "weight_bytes", "peak_memory_bytes")}
                               for s in stages]
    perf.write_trace(stages, str(out / "trace.json"), start=t0)
    perf.plot_timeline(stages, str(out / "timeline.png"), start=t0, end=t1,
                       title=f"{pipe.plan.num_stages}-stage decode of {args.new_tokens} tokens")
    # Lanes: L sequences in L lanes against the same L sequences in one lane (the fair baseline:
    # against one stream, batching alone would show as a gain).
    lanes = pipe.plan.num_stages
    batch = make_inputs(tok, [f"Tell me something about topic number {i}." for i in range(lanes)])
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    for n in (1, lanes):
        model.generate(**batch, max_new_tokens=4, lanes=n)  # warm-up
    one_lane_s = []
    for _ in range(2):
        start = time.perf_counter()
        model.generate(**batch, **kw, lanes=1)
        one_lane_s.append(time.perf_counter() - start)
    t2 = now()
    start = time.perf_counter()
    model.generate(**batch, **kw, lanes=lanes)
    lanes_s = time.perf_counter() - start
    t3 = now()
    lane_stages = pipe.stats(spans_since=t2)
    result["lanes"] = lanes
    result["lanes_aggregate_tokens_per_s"] = lanes * args.new_tokens / lanes_s
    result["one_lane_same_batch_tokens_per_s"] = lanes * args.new_tokens / min(one_lane_s)
    result["lanes_speedup_over_one_lane"] = result["lanes_aggregate_tokens_per_s"] / result["one_lane_same_batch_tokens_per_s"]
    result["lanes_breakdown"] = perf.breakdown(lane_stages, start=t2, end=t3)
    perf.plot_timeline(lane_stages, str(out / "timeline_lanes.png"), start=t2, end=min(t3, t2 + 2.0),
                       title=f"{lanes} lanes, first 2 s")
    weights = sum(s["weight_bytes"] for s in stages)
    pipe.close()
    if not args.no_baseline and weights < 0.5 * torch_pp.devices.memory_available(pipe.device):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(pipe.model_dir, dtype=pipe.dtype).to(pipe.device).eval()
        timed_generate(ref, short, new_tokens=4)
        result["baseline_hf"] = {
            "ttft_short_s": min(ttft(ref, short) for _ in range(3)),
            "ttft_long_s": min(ttft(ref, long) for _ in range(2)),
            "decode_tokens_per_s": timed_generate(ref, short, new_tokens=args.new_tokens)["decode_tokens_per_s"],
        }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print()
    base = result.get("baseline_hf", {})
    rows = [["decode tok/s (1 stream)", f"{result['decode_tokens_per_s']:.2f}", f"{base.get('decode_tokens_per_s', float('nan')):.2f}"],
            [f"batch of {result['lanes']}: tok/s in {result['lanes']} lanes / in 1 lane", f"{result['lanes_aggregate_tokens_per_s']:.2f} / "
             f"{result['one_lane_same_batch_tokens_per_s']:.2f}", "-"],
            ["TTFT short prompt (s)", f"{result['ttft_short_s']:.3f}", f"{base.get('ttft_short_s', float('nan')):.3f}"],
            [f"TTFT {args.long}-token prompt, unchunked (s)", f"{result['ttft_long_unchunked_s']:.3f}", f"{base.get('ttft_long_s', float('nan')):.3f}"],
            [f"TTFT {args.long}-token prompt, pipelined (s)", f"{result['ttft_long_pipelined_s']:.3f}", "-"]]
    print_table(rows, ["figure", "torch_pp", "HF 1 process"])
    print()
    print_table([[str(b["rank"]), f"{s['layers'][0]}:{s['layers'][1]}", f"{s['peak_memory_bytes'] / 2**20:.0f}",
                  f"{100 * b['compute_s'] / (t1 - t0):.0f}%", f"{100 * b['communication_s'] / (t1 - t0):.0f}%",
                  f"{100 * b['idle_s'] / (t1 - t0):.0f}%"] for b, s in zip(result["breakdown"], result["stages_memory"])],
                ["stage", "layers", "peak MiB", "compute", "comm", "idle"])
    print()
    print_table([[str(b["rank"]), f"{100 * b['busy_share']:.0f}%", f"{100 * b['communication_s'] / (t3 - t2):.0f}%"]
                 for b in result["lanes_breakdown"]], ["stage", f"busy with {result['lanes']} lanes", "comm"])
    print(f"\ntrace: {out / 'trace.json'}  timelines: {out / 'timeline.png'}, {out / 'timeline_lanes.png'}")


if __name__ == "__main__":
    main()
