"""Where a prompt's first token goes, rank by rank: one process against a pipeline, in one run.

    python bench/prefill_spans.py [--model DIR | --shape tiny] [--stages 2] [--device cpu]
                                  [--dtype float32] [--lengths 1430,8192] [--chunks 0,default]
                                  [--reps 3] [--json out.json]

For each prompt length and ``prefill_chunk`` setting (0: whole; ``default``: the default rule; N
tokens), it times a greedy one-token ``generate()`` (the time to first token, median of ``--reps``
after one untimed run) in one process and in ``--stages`` ranks (torchrun on this machine), and
sums each rank's spans of the last repetition (``torch_pp.trace``): ``compute`` (a stage's layers
with its copies onto and off its device; rank 0's forward less the remote calls), ``layers``
(rank 0's embedding and own layers), ``send`` (framing and Gloo), ``wait`` (blocked on the next
message) and, on rank 0, the gap (``rest``: its own host work outside the spans, including the copy
of a prefill out of its device). It is issue 30's tool for a pipeline's first token against one
process's: a hop shows as rank 0's send and the stage's wait past rank 0's layers. Prints JSON
and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import dump, print_table, torchrun_cmd  # noqa: E402

NAMES = ("compute", "layers", "send", "wait")


def run(model: str, stages: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spans.json"
        cmd = torchrun_cmd(stages, HERE / "_prefill_spans_worker.py", model, args.device, args.dtype, args.lengths,
                           args.chunks, args.reps, out)
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=args.timeout)
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(f"prefill_spans: the {stages}-rank run failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    for f in result["figures"]:
        wall = f["ttft_s"] if stages == 1 else f["walls_s"][-1]
        f["ranks"] = []
        for r, spans in enumerate(f.pop("spans")):
            sums = {n: 1000 * sum(b - a for name, a, b in spans if name == n) for n in NAMES}
            sums["sends"] = sum(name == "send" for name, _, _ in spans)
            if r == 0:  # layers lie inside compute; rank 0's other time is its own host work
                sums["rest"] = max(0.0, 1000 * wall - sums["compute"] - sums["send"] - sums["wait"])
            f["ranks"].append(sums)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder (default: a random one of --shape)")
    ap.add_argument("--shape", default="tiny", help="gpu_report's shapes: tiny, 1b, 8b, 32b")
    ap.add_argument("--workdir", default="/tmp/torch_pp_prefill_spans")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="1430,8192")
    ap.add_argument("--chunks", default="0,default", help="prefill_chunk settings: 0 (whole), default, or N tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json")
    args = ap.parse_args()
    from gpu_report import model_folder

    model = str(model_folder(args))
    one, pipe = run(model, 1, args), run(model, args.stages, args)
    alone = {}  # one process never chunks: each length's best setting, the same path
    for f in one["figures"]:
        alone[f["length"]] = min(f["ttft_s"], alone.get(f["length"], f["ttft_s"]))
    for f in pipe["figures"]:
        f["over_one_process"] = f["ttft_s"] / alone[f["length"]]
    result = {"model": model, "device": args.device, "dtype": args.dtype, "stages": args.stages,
              "one_process": one["figures"], "pipeline": pipe["figures"]}
    dump(result, args.json)
    print()
    rows = [[f["length"], "1 process", "-", f"{1000 * f['ttft_s']:.1f}", "", "", "", "", "", ""] for f in one["figures"]
            if f["chunk"] == one["figures"][0]["chunk"]]
    for f in pipe["figures"]:
        for r, s in enumerate(f["ranks"]):
            rows.append([f["length"] if r == 0 else "", f"{args.stages} stages" if r == 0 else "", f["chunk"] if r == 0 else "",
                         f"{1000 * f['ttft_s']:.1f} ({f['over_one_process']:.2f}x)" if r == 0 else "", r,
                         *(f"{s[n]:.1f}" for n in NAMES), f"{s['rest']:.1f}" if r == 0 else ""])
    print_table(rows, ["tokens", "run", "chunk", "first token ms", "rank", "compute ms", "layers ms", "send ms", "wait ms",
                       "rest ms"])


if __name__ == "__main__":
    main()
