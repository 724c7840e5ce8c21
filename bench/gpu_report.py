"""The GPU performance report: torch_pp against transformers' eager and compiled decoding, against
accelerate where there are two GPUs, and against the machine's bandwidth limit, in one run.

    python bench/gpu_report.py [--shape 8b|32b | --model DIR] [--rounds 3] [--json out.json]

It writes a random-weight model of a real shape (Llama-3.1-8B's by default, Qwen2.5-32B's with
``--shape 32b``) unless given a folder (any folder works: no tokenizer or chat template needed),
then loads the contenders once each and alternates their timed runs, round after round,
reporting medians:

* ``hf``: transformers ``generate()`` on one GPU, eager;
* ``hf_static``: the same with a ``StaticCache`` passed to ``generate()``, which makes it compile the
  decoding forward (transformers' documented fast path); one cache per size, so it compiles once
  per size, in the warm-up (each size's compile time is reported apart);
* ``accelerate`` (two GPUs or more): the model split over the GPUs in one process
  (``device_map="balanced"``), what a user with one multi-GPU box would pick instead;
* ``torch_pp_1``: torch_pp in one process;
* ``torch_pp``: two stages under torchrun, one per GPU, or both on the one GPU there is;
* ``torch_pp_eager`` (ask for it in ``--contenders``): two stages with ``graphs=False``, the
  stages' decode steps run eagerly (see ``torch_pp.model.graphs``).
* ``torch_pp_1_unfused``, ``torch_pp_unfused`` (ask for them): ``torch_pp_1`` and ``torch_pp`` with
  ``TORCH_PP_FUSE=0``, their captured steps' norms and MLPs run unfused (see ``torch_pp.model.fusion``).

The limit: the weights' bytes over the read bandwidth measured on this GPU (the best of a
reduction and a copy of 4 GiB): the decode rate of a step that does nothing but read every weight
once. Every decode figure is also reported as a share of it.

Each contender first runs every measurement once (every KV length warmed: cuDNN plans an
attention kernel per new length). Figures: decode tokens/s (one stream), time to first token
(1430- and 8192-token prompts; torch_pp unchunked, chunked and by default), a greedy batch of 8
(torch_pp by default, ``lanes=1`` and ``lanes=2``), peak memory per GPU/stage, and, on one decode
stream, torch_pp's communication share, cost per stage boundary (split into the bare Gloo hop on
this machine, measured with each rank working as long as a stage's step, and torch_pp's own) and
each stage's time per step. On CUDA each contender's worker also profiles one decode token
(torch.profiler, its own process: rank 0's in a pipeline): GPU operations launched, device busy
time and the device's idle share.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import TurnWorker, dump, gloo_floor, print_table, torchrun_cmd  # noqa: E402

SHAPES = {  # model_type, config
    "tiny": ("llama", dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),  # --device cpu smoke test
    "8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),  # a draft's shape
    "32b": ("qwen2", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8, rope_theta=1000000.0, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}


def write_model(shape: str, path: Path, device: str) -> Path:
    """A random-weight bf16 checkpoint of ``shape`` (sharded safetensors), made on ``device``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "model.safetensors.index.json").is_file():
        return path
    model_type, fields = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **fields, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, p in skeleton.named_parameters():
        # Norm weights near 1, everything else small: activations stay finite through the layers.
        t = (1 + 0.02 * torch.randn(p.shape, generator=g, device=device)) if p.dim() == 1 else \
            0.02 * torch.randn(p.shape, generator=g, device=device)
        shard[name] = t.to(torch.bfloat16).cpu()
        size += shard[name].nbytes
        if size > 4 * 2**30:
            flush()
    flush()
    total = sum((path / f).stat().st_size for f in set(index.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    config.save_pretrained(path)
    return path


def model_folder(args) -> Path:
    """``args.model``, or a random model of ``args.shape`` written under ``args.workdir`` (on the GPU
    where ``args.device`` is CUDA, else on the CPU) the first time."""
    if args.model:
        return Path(args.model)
    return write_model(args.shape, Path(args.workdir) / args.shape, "cuda" if args.device == "cuda" else "cpu")


def specs(args) -> dict[str, dict]:
    # Short runs repeat back to back within a turn (``reps``, the worker reports medians): one
    # prefill of 60 ms or one batch of 0.1 s varied by 10% from run to run on 2x H200.
    out = {"decode": {"what": "decode", "len": 32, "new": args.new_tokens}}
    for length in (args.long, args.xlong):
        ttft = {"len": length, "new": 1, "reps": args.reps}
        out[f"ttft{length}"] = ttft
        out[f"ttft{length}_unchunked"] = {**ttft, "chunk": 0}
        out[f"ttft{length}_chunked"] = {**ttft, "chunk": max(64, length // 4)}  # finer than 1024 at 1430 tokens, coarser at 8192
        out[f"ttft{length}_chunk1024"] = {**ttft, "chunk": 1024}
    batch = {"len": 32, "batch": 8, "new": args.new_tokens, "reps": args.reps}
    out["batch8"] = batch
    out["batch8_lanes1"] = {**batch, "lanes": 1}
    out["batch8_lanes2"] = {**batch, "lanes": 2}
    return out


ONLY_PIPELINE = ("_unchunked", "_chunked", "_chunk1024", "_lanes1", "_lanes2")


def read_bandwidth(device: str, *, gib: int = 4, reps: int = 10) -> float | None:
    """Bytes per second this GPU reads: the best of a reduction (reads only) and a copy (reads and
    writes as much), medians of ``reps`` timed by CUDA events. None off CUDA."""
    import torch

    if device != "cuda":
        return None
    x = torch.ones(gib * 2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = {"reduce": [], "copy": []}
    for i in range(reps + 2):  # two untimed: the kernels' first launches
        for kind, moved in (("reduce", x.nbytes), ("copy", 2 * x.nbytes)):
            start.record()
            if kind == "reduce":
                x.amax()
            else:
                y.copy_(x)
            end.record()
            end.synchronize()
            if i >= 2:
                rates[kind].append(moved / (start.elapsed_time(end) / 1000))
    del x, y
    torch.cuda.empty_cache()
    return max(statistics.median(v) for v in rates.values())


def weight_bytes(model: Path) -> int:
    """The checkpoint's tensor bytes (what a decode step reads, less the embedding rows it skips)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 2)
    return total


def summarize(args, model, names, plan, runs, finals, limit=None) -> dict:
    """Medians, memory (once ``finals`` holds each worker's last figures), equal tokens and decode ratios."""

    def med(name, key, field):
        values = [x[field] for x in runs[name][key] if x.get(field) is not None]
        return statistics.median(values) if values else None

    result = {"model": str(model), "shape": None if args.model else args.shape, "rounds": args.rounds,
              "new_tokens": args.new_tokens, "figures": {}, "runs": {}, "memory": {}, "same_tokens": {}}
    for name in names:
        fig = result["figures"][name] = {}
        result["runs"][name] = {}
        for key in plan:
            if runs[name][key]:
                field = {"decode": "decode_tokens_per_s"}.get(key, "tokens_per_s" if key.startswith("batch") else "wall_s")
                fig[key] = med(name, key, field)
                result["runs"][name][key] = [x.get(field) for x in runs[name][key]]  # in round order
        if runs[name].get("decode"):
            fig["decode_ttft_s"] = med(name, "decode", "ttft_s")
        if name in finals:
            result["memory"][name] = finals[name].get("peak_memory_bytes") or [s["peak_memory_bytes"] for s in finals[name]["stages"]]
            if finals[name].get("profile"):
                result.setdefault("profile", {})[name] = finals[name]["profile"]
    if "hf_static" in finals:
        result["compile_s"] = finals["hf_static"].get("compile_s")
    if "torch_pp" in finals:
        result["torch_pp"] = {k: finals["torch_pp"][k]
                              for k in ("communication_share", "per_boundary_ms", "per_step_ms_by_stage", "stages")}
    for i, a in enumerate(names):  # greedy tokens, every pair of contenders
        for b in names[i + 1:]:
            for key in (k for k in ("decode", "batch8") if k in plan):
                result["same_tokens"][f"{a}/{b}/{key}"] = all(
                    x["tokens"] == y["tokens"] for x, y in zip(runs[a][key], runs[b][key]))
    if "torch_pp" in names:
        fig = result["figures"]["torch_pp"]
        for length in (args.long, args.xlong):  # the default rule against the best fixed choice
            best = [fig.get(f"ttft{length}{v}") for v in ("_unchunked", "_chunked", "_chunk1024")]
            if fig.get(f"ttft{length}") and all(best):
                fig[f"ttft{length}_default_over_best"] = fig[f"ttft{length}"] / min(best)
    for ours in (n for n in names if n.startswith("torch_pp")):
        for other in (n for n in names if not n.startswith("torch_pp")):
            # Each round's runs share the machine's moment: ratios per round, then their median.
            for key, field in (("decode", "decode_tokens_per_s"), ("batch8", "tokens_per_s")):
                ratios = [p[field] / h[field] for h, p in zip(runs[other].get(key, []), runs[ours].get(key, []))]
                if ratios:
                    result["figures"][ours][f"{key}_ratio_over_{other}"] = statistics.median(ratios)
    if limit:
        result["limit"] = limit
        for name in names:
            if result["figures"][name].get("decode"):
                result["figures"][name]["decode_share_of_limit"] = result["figures"][name]["decode"] / limit["decode_tokens_per_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--model", help="an HF model folder instead of a random one")
    ap.add_argument("--workdir", default="/tmp/torch_pp_gpu_report", help="where the random model is written")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="back-to-back repetitions of each prefill and batch run per turn")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--long", type=int, default=1430)
    ap.add_argument("--xlong", type=int, default=8192)
    ap.add_argument("--contenders", help="comma-separated (default: hf,hf_static,torch_pp_1,torch_pp, "
                                         "and accelerate where there are two GPUs or more)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a CPU's figures (with --dtype float32) or a smoke test")
    ap.add_argument("--dtype", default="bfloat16", help="the contenders' dtype (the random model is written in bf16)")
    ap.add_argument("--figures", help="only these figures, comma-separated (default: all)")
    ap.add_argument("--start", default="{}", help="more torch_pp.start() options for the torch_pp contenders, as JSON "
                                                  "(e.g. '{\"layers\": \"0:12,12:32\"}')")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()

    model = model_folder(args)
    plan = specs(args)
    if args.figures:
        plan = {k: v for k, v in plan.items() if k in args.figures.split(",")}
    import torch

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    names = (args.contenders or "hf,hf_static" + (",accelerate" if gpus > 1 else "") + ",torch_pp_1,torch_pp").split(",")
    bandwidth = read_bandwidth(args.device)
    limit = None if bandwidth is None else {"read_bytes_per_s": bandwidth, "weight_bytes": weight_bytes(model),
                                            "decode_tokens_per_s": bandwidth / weight_bytes(model)}
    shared = [s for k, s in plan.items() if not k.endswith(ONLY_PIPELINE)]
    cmds = {  # each a function: a torchrun command takes a free port when made, one per worker
        "hf": lambda: ([sys.executable, str(HERE / "_gpu_worker.py"), "hf", str(model)], shared),
        "hf_static": lambda: ([sys.executable, str(HERE / "_gpu_worker.py"), "hf-static", str(model)], shared),
        "torch_pp_1": lambda: (torchrun_cmd(1, HERE / "_gpu_worker.py", "pipeline", str(model)), shared),
        "accelerate": lambda: ([sys.executable, str(HERE / "_gpu_worker.py"), "balanced", str(model)], shared),
        "torch_pp": lambda: (torchrun_cmd(2, HERE / "_gpu_worker.py", "pipeline", str(model)), list(plan.values())),
        "torch_pp_eager": lambda: (torchrun_cmd(2, HERE / "_gpu_worker.py", "pipeline-eager", str(model)), shared),
    }
    workers = {}
    for name in names:  # one at a time: loading three models at once would measure the disk
        cmd, warm = cmds[name.removesuffix("_unfused")]()
        unfused = {"TORCH_PP_FUSE": "0"} if name.endswith("_unfused") else {}
        workers[name] = TurnWorker(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_SPECS": json.dumps(warm),
                                         "BENCH_DEVICE": args.device, "BENCH_START": args.start,
                                         "BENCH_DTYPE": args.dtype, **unfused})
    runs: dict[str, dict[str, list[dict]]] = {n: {k: [] for k in plan} for n in names}
    for r in range(args.rounds):
        # The figures in a new order each round, as well as the contenders: a run can pay for the
        # one before it (a 1430-token prompt right after a decode stream ran 1.25x slower than the
        # same prompt in the same code path next to it, 2x H200).
        keys = list(plan)
        random.Random(r).shuffle(keys)
        for key in keys:
            spec = plan[key]
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                if name != "torch_pp" and key.endswith(ONLY_PIPELINE):
                    continue
                runs[name][key].append(workers[name].ask("run " + json.dumps(spec)))
        if args.json:  # each round's figures so far: a run cut short still leaves them
            Path(args.json).write_text(json.dumps(summarize(args, model, names, plan, runs, {}, limit), indent=1))
    finals = {name: w.close() for name, w in workers.items()}
    result = summarize(args, model, names, plan, runs, finals, limit)
    if "torch_pp" in result:
        # The bare Gloo hop on this machine, each rank working as long as a stage's decode step:
        # the floor under the per-boundary cost; the rest is torch_pp's own.
        tp = result["torch_pp"]
        work = statistics.mean(s["compute"] for s in tp["per_step_ms_by_stage"])
        tp["gloo_floor_ms"] = gloo_floor(2, work, rounds=300)
        tp["own_per_boundary_ms"] = tp["per_boundary_ms"] - tp["gloo_floor_ms"]
    dump(result, args.json)

    print()
    f = result["figures"]
    rows = []
    for key in plan:
        unit = "tok/s" if key == "decode" or key.startswith("batch") else "ms"
        scale = 1 if unit == "tok/s" else 1000
        rows.append([key, unit] + [("-" if f[n].get(key) is None else f"{f[n][key] * scale:.1f}") for n in names])
    if limit:
        rows.append(["decode share of the limit", "", *(f"{f[n]['decode_share_of_limit']:.2f}" if f[n].get("decode_share_of_limit") else "-"
                                                    for n in names)])
    for field, label in (("gpu_ops_per_token", "GPU operations per token (rank 0)"),
                         ("device_busy_ms_per_token", "device busy per token (rank 0)"),
                         ("device_idle_share", "device idle share (rank 0)")):
        if result.get("profile"):
            rows.append([label, "ms" if field.endswith("_ms_per_token") else ""] +
                        [f"{result['profile'][n][field]:.{3 if 'share' in field else 1}f}" if n in result["profile"] else "-"
                         for n in names])
    rows.append(["peak memory per GPU/stage", "GiB"] + [" / ".join(f"{b / 2**30:.1f}" for b in result["memory"][n]) for n in names])
    print_table(rows, ["figure", "unit", *names])
    if limit:
        print(f"\nlimit: {limit['weight_bytes'] / 1e9:.2f} GB of weights at {limit['read_bytes_per_s'] / 1e12:.2f} TB/s measured: "
              f"{limit['decode_tokens_per_s']:.1f} tok/s")
    if result.get("compile_s"):
        print("hf_static compile time per figure (s): " + ", ".join(f"{v:.1f}" for v in result["compile_s"].values()))
    if "torch_pp" in result:
        tp = result["torch_pp"]
        print(f"\ntorch_pp, layers {','.join('%d:%d' % tuple(st['layers']) for st in tp['stages'])}; one decode stream: communication share {100 * tp['communication_share']:.1f}%, per stage boundary "
              f"{tp['per_boundary_ms']:.2f} ms: the bare Gloo hop {tp['gloo_floor_ms']:.2f} ms, torch_pp's own "
              f"{tp['own_per_boundary_ms']:.2f} ms; per decode step by stage (ms): {tp['per_step_ms_by_stage']}; decode ratios: " +
              ", ".join(f"over {k.split('_over_')[1]} {v:.3f}" for k, v in f["torch_pp"].items() if k.startswith("decode_ratio")))


if __name__ == "__main__":
    main()
