"""Decode benchmark: a 2-stage pipeline vs single-process transformers generate(), same run.

Embedded SmolLM2-135M-Instruct, CPU, fp32, one thread per process, greedy, a fixed number
of new tokens. Reports the write-up's four figures for each side: decode tokens/s, time to
first token, peak memory per node (stage), and the share of time spent communicating
(pipeline only: rank 0's wait for the other stages minus their compute).

Both sides load once, then their repetitions alternate (HF, pipeline, pipeline, HF, ...) so
that a shared machine's drift hits both alike; the ratio is the median of the rounds' ratios.

    python bench/bench_decode.py [--new-tokens 128] [--reps 6] [--stages 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, alternate, dump, median_of, print_table, torchrun_cmd  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both stages share the one device)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--random-like-default", metavar="DIR",
                    help="use a random-weight model shaped like SmolLM2-135M, written to DIR (for machines without the package)")
    args = ap.parse_args()

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
    runs = alternate(workers, args.reps)
    hf, pp = workers["hf"].close(), workers["pp"].close()
    for name, side in (("hf", hf), ("pp", pp)):
        side.update(ttft_s=median_of(runs[name], "ttft_s"), decode_tokens_per_s=median_of(runs[name], "decode_tokens_per_s"))
    # Each round's two runs share the machine's conditions of the moment: the median of their ratios.
    pair_ratios = [p["decode_tokens_per_s"] / h["decode_tokens_per_s"] for h, p in zip(runs["hf"], runs["pp"])]

    result = {
        "model": model_dir, "new_tokens": args.new_tokens, "reps": args.reps, "stages": args.stages,
        "threads_per_process": 1, "device": args.device, "dtype": args.dtype,
        "baseline_hf": {k: hf[k] for k in ("decode_tokens_per_s", "ttft_s", "peak_memory_bytes")},
        "pipeline": {
            "decode_tokens_per_s": pp["decode_tokens_per_s"], "ttft_s": pp["ttft_s"],
            "communication_share": pp["communication_share"], "per_boundary_ms": pp["per_boundary_ms"],
            "stages": [{k: s[k] for k in ("rank", "layers", "weight_bytes", "peak_memory_bytes")} for s in pp["stages"]],
        },
        "decode_ratio_pipeline_over_hf": statistics.median(pair_ratios),
        "decode_ratio_per_round": pair_ratios,
        "same_tokens": all(p["tokens"] == h["tokens"] for h, p in zip(runs["hf"], runs["pp"])),
    }
    dump(result, args.json)
    print()
    rows = [
        ["HF single process", f"{hf['decode_tokens_per_s']:.2f}", f"{hf['ttft_s'] * 1000:.1f}", f"{hf['peak_memory_bytes'] / 2**20:.0f}", "-"],
        [f"torch_pp {args.stages} stages", f"{pp['decode_tokens_per_s']:.2f}", f"{pp['ttft_s'] * 1000:.1f}",
         " / ".join(f"{s['peak_memory_bytes'] / 2**20:.0f}" for s in pp["stages"]), f"{100 * pp['communication_share']:.1f}%"],
    ]
    print_table(rows, ["run", "decode tok/s", "TTFT ms", "peak MiB per stage", "comm share"])
    print(f"\ndecode ratio pipeline/HF: {result['decode_ratio_pipeline_over_hf']:.3f} (goal >= 0.97); "
          f"same tokens: {result['same_tokens']}; per stage boundary: {pp['per_boundary_ms']:.3f} ms")


if __name__ == "__main__":
    main()
