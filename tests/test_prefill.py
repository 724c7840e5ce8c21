"""Pipelined (chunked) prefill gives the logits and tokens of the unchunked prefill."""

import json
import math

import pytest

from conftest import WORKERS, torchrun


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_equals_unchunked(tiny_models, tmp_path, stages, arch):
    run = torchrun(stages, [str(WORKERS / "prefill_worker.py"), str(tiny_models[arch])], env={"OUT": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "prefill.json").read_text())
    for chunk, r in report.items():
        assert r["logits_max_diff"] <= 1e-5, (chunk, r)
        assert r["tokens_equal"] and r["batch_equal"], (chunk, r)
    # The prompt really went through in chunks: one stage forward per chunk.
    assert report["0"]["stage1_forwards"] == 1
    for size in (3, 7, 16):
        assert report[str(size)]["stage1_forwards"] == math.ceil(40 / size)
    assert report["None"]["stage1_forwards"] == 1  # 40 tokens: below the default minimum chunk


def test_default_chunk_sends_short_prompts_whole():
    """About four chunks per stage, at least the device's minimum each; a prompt under two minimum
    chunks goes whole (a short second chunk costs a message and overlaps little)."""
    from torch_pp.rank0.forward import default_chunk

    assert default_chunk(1430, 2, smallest=1024) == 1430  # accelerator: whole
    assert default_chunk(8192, 2, smallest=1024) == 1024
    assert default_chunk(100, 2, smallest=64) == 100  # CPU: whole
    assert default_chunk(1040, 2, smallest=64) == 130
    assert default_chunk(200, 3, smallest=64) == 64
