"""Where each rank's host time goes in a decode stream, one process against a pipeline, in one run.

    python bench/profile_ranks.py [--model DIR | --shape tiny] [--stages 2] [--device cpu]
                                  [--dtype float32] [--new 200] [--rate 500] [--json out.json]

For one process and for ``--stages`` ranks (torchrun on this machine), it warms a greedy stream of
``--new`` tokens, then samples every rank's Python stacks with py-spy (``--idle``: waits count)
while the same stream repeats, and reports per rank, in ms per token: waiting for the previous
rank (Gloo's receive), in decoder layers (their eager forwards, or a captured step's replay),
the hops (torch_pp's own code that moves a step between ranks and into a stage's layers: anything
under ``net``, ``runtime``, ``rank0.ring``, ``rank0.outbox``, ``devices.copies``; waits and layers
excluded) and the rest of the host
work (``generate()``'s bookkeeping, the model's forward around its layers), with the functions
that take it. On a GPU, host time outside the layers and hops is time the device may idle:
that is what issue 30's two-stage ratio is made of. ``pipeline_extra_host_ms`` is rank 0's host time
beyond the one-process run's, plus every other rank's. Needs ``py-spy`` (``pip install py-spy``)
and leave to attach to processes (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import dump, print_table, torchrun_cmd  # noqa: E402

HOPS = ("torch_pp/net/", "torch_pp/runtime/", "torch_pp/rank0/ring.py", "torch_pp/rank0/outbox.py",
        "torch_pp/devices/copies.py", "torch_pp/rank0/replies.py")
LAYERS = re.compile(r"DecoderLayer\.forward|Block\.forward|Slot\._recorded|CUDAGraph\.replay")
WAIT = "GlooLink.recv"
STREAM = "stream ("  # rank 0's timed streams in ``_profile_worker``


def attribute(lines, *, tokens: int, rate: int, within: str | None = None, top: int = 12) -> dict:
    """One rank's py-spy samples (``--format raw`` lines: ``frame;frame;... count``, the main thread
    only: stacks from the worker's module) as ms per token: ``wait``, ``layers``, ``hops``, ``host``
    (the rest) and ``top_host``, the functions the host time is spent in (their own time). ``within``: only
    stacks through this function (rank 0's timed streams, not its waits for py-spy)."""
    per = {"wait": 0, "layers": 0, "hops": 0, "host": 0}
    functions = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or "_profile_worker.py" not in stack.split(";", 1)[0]:
            continue  # another thread (liveness monitor, tqdm's)
        if within is not None and within not in stack:
            continue
        n = int(count)
        frames = [re.sub(r"\s+\(", " (", f) for f in stack.split(";")]
        if WAIT in stack:
            per["wait"] += n
        elif LAYERS.search(stack):
            per["layers"] += n
        elif any(h in f for f in frames for h in HOPS):
            per["hops"] += n
        else:
            per["host"] += n
            functions[re.sub(r":\d+\)$", ")", frames[-1])] += n  # where the time is spent, not the callers
    ms = lambda n: 1000.0 * n / rate / tokens  # noqa: E731
    return {**{k: ms(v) for k, v in per.items()},
            "top_host": [[f, round(ms(c), 4)] for f, c in functions.most_common(top)]}


def profile(model: str, stages: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = torchrun_cmd(stages, HERE / "_profile_worker.py", model, out, args.new, args.rate)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_DEVICE": args.device, "BENCH_DTYPE": args.dtype,
               "BENCH_START": args.start}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        info_path = Path(out) / "run.json"
        if run.returncode != 0 or not info_path.is_file():
            raise SystemExit(f"profile_ranks: the {stages}-rank run failed:\n{run.stderr[-3000:]}")
        info = json.loads(info_path.read_text())
        if info["failed"] or not info["streams"]:
            raise SystemExit(f"profile_ranks: py-spy could not sample ({info['failed'] or 'no stream fit'}); "
                             "run as root or allow ptrace (kernel.yama.ptrace_scope=0)")
        tokens = info["streams"] * info["new_tokens"]
        ranks = [attribute((Path(out) / f"rank{r}.txt").read_text().splitlines(), tokens=tokens, rate=info["rate"],
                           within=STREAM if r == 0 else None)
                 for r in range(info["ranks"])]
        step = 1000.0 * sum(info["wall_s"]) / tokens
        for r in ranks[1:]:  # a stage also waits between the streams: its wait is the step's time it was not busy
            r["wait"] = max(0.0, step - r["layers"] - r["hops"] - r["host"])
        return {"ms_per_token": step, "tokens_sampled": tokens, "ranks": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder (default: a random one of --shape)")
    ap.add_argument("--shape", default="tiny", help="gpu_report's shapes: tiny, 1b, 8b, 32b")
    ap.add_argument("--workdir", default="/tmp/torch_pp_profile_ranks")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new", type=int, default=200, help="tokens per timed stream")
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--start", default="{}", help="more torch_pp.start() options, as JSON")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json")
    args = ap.parse_args()
    from gpu_report import model_folder

    model = str(model_folder(args))
    result = {"model": model, "device": args.device, "dtype": args.dtype, "stages": args.stages, "new_tokens": args.new,
              "one_process": profile(model, 1, args), "pipeline": profile(model, args.stages, args)}
    one, pipe = result["one_process"]["ranks"][0], result["pipeline"]["ranks"]
    result["pipeline_extra_host_ms"] = (pipe[0]["host"] + pipe[0]["hops"] - one["host"] - one["hops"]
                                        + sum(r["host"] + r["hops"] for r in pipe[1:]))
    dump(result, args.json)
    print()
    rows = [["one process", "0", f"{result['one_process']['ms_per_token']:.3f}",
             *(f"{one[k]:.3f}" for k in ("wait", "layers", "hops", "host"))]]
    rows += [[f"{args.stages} stages", str(r), f"{result['pipeline']['ms_per_token']:.3f}" if r == 0 else "",
              *(f"{s[k]:.3f}" for k in ("wait", "layers", "hops", "host"))] for r, s in enumerate(pipe)]
    print_table(rows, ["run", "rank", "ms/token", "wait", "layers", "hops", "host"])
    print(f"\nthe pipeline's host time beyond one process's: {result['pipeline_extra_host_ms']:.3f} ms per token")
    print("rank 0's host time in the pipeline, by function (its own time, ms per token):")
    for f, v in pipe[0]["top_host"][:8]:
        print(f"  {v:7.3f}  {f}")


if __name__ == "__main__":
    main()
