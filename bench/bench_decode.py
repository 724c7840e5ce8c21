"""Decode benchmark: a 2-stage pipeline vs single-process transformers generate(), same run.

Embedded SmolLM2-135M-Instruct, CPU, fp32, one thread per process, greedy, a fixed number
of new tokens. Reports the write-up's four figures for each side: decode tokens/s, time to
first token, peak memory per node (stage), and the share of time spent communicating
(pipeline only: rank 0's wait for the other stages minus their compute).

A third side, the floor, is a bare pipeline of the same layers under the same plan
(``_bare_pipeline.py``: transformers' generate() on rank 0, the hidden state passed round the
ring over plain Gloo, one message per hop, nothing of torch_pp's): what any pipeline of
separate processes pays on this machine. Its ratio to HF is the machine's; the pipeline's ratio
to it is torch_pp's own.

All sides load once, then their repetitions take turns, each round in the next of all orders,
so that a shared machine's drift hits them alike; each ratio is the median of the rounds'
ratios (use a multiple of 6 repetitions with the floor).

Decode tokens/s come from the streamer (first to last new token), or with ``--outside 32,160``
from outside: the extra tokens of a 160-token run over a 32-token one, over the extra wall time.

    python bench/bench_decode.py [--new-tokens 128] [--reps 6] [--stages 2] [--no-floor] [--outside S,L] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, alternate, dump, median_of, outside_turn, print_table, torchrun_cmd  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."


def write_random_like_default(path: Path) -> str:
    """A random-weight Llama with SmolLM2-135M's shape (weights do not change the timing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                                      rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def floor_unsupported(model_dir: str) -> str | None:
    """Why the bare pipeline cannot run this model, or None: its ``Remote`` passes one mask and the
    (cos, sin) pair round the ring, which covers the families of full attention that torch_pp's
    captured steps cover."""
    from transformers import AutoConfig

    from torch_pp.model import graphs

    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    reason = graphs.unsupported(config)
    return None if reason is None else f"the bare pipeline covers {', '.join(graphs.FAMILIES)} with full attention ({reason})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both stages share the one device)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-floor", action="store_true", help="leave out the bare pipeline (the machine's floor)")
    ap.add_argument("--outside", metavar="SHORT,LONG",
                    help="measure decode from outside instead of by the streamer: the extra tokens of a LONG run over a "
                         "SHORT one (e.g. 32,160) over the extra wall time")
    ap.add_argument("--random-like-default", metavar="DIR",
                    help="use a random-weight model shaped like SmolLM2-135M, written to DIR (for machines without the package)")
    args = ap.parse_args()
    outside = tuple(int(n) for n in args.outside.split(",")) if args.outside else None
    if outside is not None and not (len(outside) == 2 and 0 < outside[0] < outside[1]):
        ap.error(f"--outside takes SHORT,LONG with 0 < SHORT < LONG, not {args.outside!r}")
    rate = "outside_tokens_per_s" if outside else "decode_tokens_per_s"

    from torch_pp.default_model import ensure_default_model

    if args.random_like_default:
        model_dir = write_random_like_default(Path(args.random_like_default))
    else:
        model_dir = args.model or str(ensure_default_model())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DEVICE": args.device, "BENCH_DTYPE": args.dtype}
    common = [model_dir, PROMPT, str(args.new_tokens)]
    workers = {
        "hf": TurnWorker([sys.executable, str(HERE / "_hf_worker.py"), *common], env),
        "pp": TurnWorker(torchrun_cmd(args.stages, HERE / "_pipeline_worker.py", *common), env),
    }
    no_floor = "--no-floor" if args.no_floor else floor_unsupported(model_dir)
    if no_floor is None:  # under the plan torch_pp chose
        workers["floor"] = TurnWorker(torchrun_cmd(args.stages, HERE / "_bare_pipeline.py", *common, workers["pp"].ready["plan"]), env)
    else:
        print(f"floor left out: {no_floor}", file=sys.stderr)
    runs = alternate(workers, args.reps, outside_turn(*outside) if outside else None)
    final = {name: worker.close() for name, worker in workers.items()}
    hf, pp = final["hf"], final["pp"]
    for name, side in final.items():
        side.update(ttft_s=median_of(runs[name], "ttft_s"), decode_tokens_per_s=median_of(runs[name], rate))

    def ratios(a: str, b: str) -> list[float]:
        """Each round's decode rate of ``a`` over ``b``: a round's runs share the machine's conditions of the moment."""
        return [x[rate] / y[rate] for x, y in zip(runs[a], runs[b])]

    pair_ratios = ratios("pp", "hf")

    result = {
        "model": model_dir, "new_tokens": args.new_tokens, "reps": args.reps, "stages": args.stages,
        "threads_per_process": 1, "device": args.device, "dtype": args.dtype,
        "decode_measured": f"from outside: {outside[0]} vs {outside[1]} new tokens" if outside else "by the streamer, first to last token",
        "baseline_hf": {k: hf[k] for k in ("decode_tokens_per_s", "ttft_s", "peak_memory_bytes")},
        "pipeline": {
            "decode_tokens_per_s": pp["decode_tokens_per_s"], "ttft_s": pp["ttft_s"],
            "communication_share": pp["communication_share"], "per_boundary_ms": pp["per_boundary_ms"],
            "stages": [{k: s[k] for k in ("rank", "layers", "weight_bytes", "peak_memory_bytes")} for s in pp["stages"]],
        },
        "decode_ratio_pipeline_over_hf": statistics.median(pair_ratios),
        "decode_ratio_per_round": pair_ratios,
        "same_tokens": all(r["tokens"] == runs["hf"][0]["tokens"] for side in runs.values() for r in side),
    }
    if "floor" in final:
        result["floor"] = {"plan": final["floor"]["plan"], "decode_tokens_per_s": final["floor"]["decode_tokens_per_s"],
                           "ttft_s": final["floor"]["ttft_s"],
                           "decode_ratio_floor_over_hf": statistics.median(ratios("floor", "hf")),
                           "decode_ratio_pipeline_over_floor": statistics.median(ratios("pp", "floor"))}
    dump(result, args.json)
    print()
    rows = [
        ["HF single process", f"{hf['decode_tokens_per_s']:.2f}", f"{hf['ttft_s'] * 1000:.1f}", f"{hf['peak_memory_bytes'] / 2**20:.0f}", "-"],
        [f"torch_pp {args.stages} stages", f"{pp['decode_tokens_per_s']:.2f}", f"{pp['ttft_s'] * 1000:.1f}",
         " / ".join(f"{s['peak_memory_bytes'] / 2**20:.0f}" for s in pp["stages"]), f"{100 * pp['communication_share']:.1f}%"],
    ]
    if "floor" in final:
        floor = final["floor"]
        rows.append([f"bare {args.stages}-process pipeline (floor)", f"{floor['decode_tokens_per_s']:.2f}", f"{floor['ttft_s'] * 1000:.1f}", "-", "-"])
    print_table(rows, ["run", "decode tok/s", "TTFT ms", "peak MiB per stage", "comm share"])
    print(f"\ndecode ratio pipeline/HF: {result['decode_ratio_pipeline_over_hf']:.3f} (goal >= 0.95); "
          f"same tokens: {result['same_tokens']}; per stage boundary: {pp['per_boundary_ms']:.3f} ms")
    if "floor" in result:
        print(f"floor/HF (this machine's cost of {args.stages} processes): {result['floor']['decode_ratio_floor_over_hf']:.3f}; "
              f"pipeline/floor (torch_pp's own): {result['floor']['decode_ratio_pipeline_over_floor']:.3f}")


if __name__ == "__main__":
    main()
