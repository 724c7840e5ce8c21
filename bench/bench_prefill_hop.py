"""What a prefill's hop between two ranks of one machine costs, taken apart, and torch_pp's own hop beside it.

    python bench/bench_prefill_hop.py [--device cuda] [--dtype bfloat16] [--hidden 4096]
                                      [--lengths 1430,8192] [--reps 10] [--json out.json]

A prefill sends the prompt's whole hidden state [1, L, H] to the next stage: rank 0 copies it out of
its device, frames it (a host copy into the message's payload), Gloo sends it over loopback, the
stage copies it onto its device. For each prompt length this times the parts apart (medians over
``--reps`` rounds, pageable and pinned copies alternating; the first round only warms), with pageable
host memory (the path of a message past ``Outbox``'s kept layouts until 2026-12-08: ``devices.copies.to_host``
then ``net.wire.pack``) and, on CUDA, page-locked memory copied straight into the payload. The
difference is what pinned staging could save on a prefill's time to first token; Gloo's part is the
floor it cannot. On a CPU only the framing copy and Gloo's part exist. Last, torch_pp's own hop of the
same tensor, one way over the same Gloo group (``torch_pp``: rank 0's ``Outbox``, the link's framing
into its kept buffers, the stage's kept receive and ``Inbox``). Prints JSON and a table.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=4096, help="the model's hidden size (8B: 4096)")
    ap.add_argument("--lengths", default="1430,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hop.json"
        run = subprocess.run(torchrun_cmd(2, HERE / "_prefill_hop_worker.py", args.device, args.dtype, args.hidden,
                                          args.lengths, args.reps, out),
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if run.returncode != 0 or not out.is_file():
            raise SystemExit(f"bench_prefill_hop: the 2-rank run failed:\n{run.stderr[-3000:]}")
        result = json.loads(out.read_text())
    rows = []
    for length, f in result["figures"].items():
        page = f["out_pageable"] + f["host_copy"] + f["gloo"] + f["in_pageable"]  # the path before the links kept pinned buffers
        pin = f["out_pinned"] + f["gloo"] + f["in_pinned"] if result["pinned"] else None
        f["hop_pageable_ms"], f["hop_pinned_ms"] = page, pin
        rows.append([length, f"{f['megabytes']:.1f}", f"{f['out_pageable']:.2f}", f"{f['out_pinned']:.2f}" if pin is not None else "-",
                     f"{f['host_copy']:.2f}", f"{f['gloo']:.2f}", f"{f['in_pageable']:.2f}",
                     f"{f['in_pinned']:.2f}" if pin is not None else "-", f"{page:.2f}", f"{pin:.2f}" if pin is not None else "-",
                     f"{f['torch_pp']:.2f}"])
    dump(result, args.json)
    print()
    print_table(rows, ["tokens", "MB", "out pageable ms", "out pinned ms", "framing ms", "Gloo ms", "in pageable ms", "in pinned ms",
                       "hop pageable ms", "hop pinned ms", "torch_pp's hop ms"])


if __name__ == "__main__":
    main()
