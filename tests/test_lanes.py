"""Sequence lanes: sub-batches in flight at once give transformers' tokens for the same sub-batches."""

import json

import pytest

from conftest import WORKERS, torchrun


@pytest.mark.parametrize("stages", [2, 3])
def test_lanes_equal_transformers_sub_batches(tiny_models, tmp_path, stages):
    run = torchrun(stages, [str(WORKERS / "lanes_worker.py"), str(tiny_models["qwen3"])], env={"OUT": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp_path / "lanes.json").read_text())
    assert r["lanes2"] and r["lanes3"]
    assert r["default"]
    # one prefill plus 19 decode steps per lane, one lane per stage
    assert r["default_forwards"] == stages * 20
    assert r["short_ok"] and r["long_ok"], "a lane finishing early disturbed another"
    assert r["single_after"]
