"""The decode benchmark's machinery on a tiny model: alternating turns, the same tokens on both sides."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_decode_alternates_and_agrees(tiny_models, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--model", str(tiny_models["llama"]),
                          "--new-tokens", "6", "--reps", "3", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_tokens"] is True
    assert len(result["decode_ratio_per_round"]) == 3 and all(r > 0 for r in result["decode_ratio_per_round"])
    assert [s["layers"] for s in result["pipeline"]["stages"]] == [[0, 2], [2, 4]]
    assert result["pipeline"]["per_boundary_ms"] > 0 and 0 < result["pipeline"]["communication_share"] < 1
    assert "decode ratio pipeline/HF" in run.stdout
