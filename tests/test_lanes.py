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
    # by default one lane: one prefill plus 19 decode steps
    assert r["default_forwards"] == 20
    assert r["short_ok"] and r["long_ok"], "a lane finishing early disturbed another"
    assert r["single_after"]


def test_a_lane_failure_is_raised_as_itself():
    """A sub-batch's own error reaches the caller (nothing sent afterwards can mask it)."""
    import torch

    from torch_pp.runtime.lanes import split_generate

    class Boom(RuntimeError):
        pass

    def generate(*, input_ids, **_):
        if input_ids[0, 0] == 7:
            raise Boom("lane B failed")
        return input_ids

    with pytest.raises(Boom, match="lane B failed"):
        split_generate(generate, lanes=2, pad_with=0, input_ids=torch.tensor([[1, 2], [7, 8]]))
