"""Each stage's peak memory stays at its share of the weights (a few-hundred-MB model, 2 real ranks)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import WORKERS, torchrun

SLACK = 64 * 2**20  # allocator and bookkeeping beyond the weights


def write_model(path):
    config = AutoConfig.for_model("llama", vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="100MB")
    return path


def test_peak_rss_stays_at_the_share(tmp_path):
    folder = write_model(tmp_path / "model")
    run = torchrun(2, [str(WORKERS / "rss_worker.py"), str(folder)], env={"OUT": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    shares = []
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rss{rank}.json").read_text())
        added = r["peak"] - r["baseline"]
        shares.append(r["share"])
        assert r["share"] < 0.75 * total, f"rank {rank} holds {r['share']} of {total} bytes"
        assert added <= 1.15 * r["share"] + SLACK, f"rank {rank}: peak grew {added / 2**20:.0f} MiB for a {r['share'] / 2**20:.0f} MiB share"
    # On CPUs the 16,000-row head is split: rank 1 also holds (and read alone) its 8,000 rows and the final norm.
    assert r["head_rows"] == 8000
    assert abs(sum(shares) - total - 4 * (8000 * 768 + 768)) < 0.01 * total


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_stage_peaks_at_its_quantized_share(tmp_path, mode):
    """Each linear weight is quantized as it is read, so the peak follows the quantized share."""
    folder = write_model(tmp_path / "model")
    run = torchrun(2, [str(WORKERS / "rss_worker.py"), str(folder)], env={"OUT": str(tmp_path), "QUANTIZE": mode}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    r = json.loads((tmp_path / "rss1.json").read_text())  # rank 1: decoder layers, all linear weights int8
    layers = r["share"] - 4 * (r["head_rows"] * 768 + 768)  # and its rows of the split head, which stay float32
    assert layers < {"int8": 0.3, "int4": 0.2}[mode] * total / 2, f"rank 1 holds {layers} bytes of layers of a {total}-byte fp32 model"
    added = r["peak"] - r["baseline"]
    assert added <= 1.15 * r["share"] + SLACK, f"peak grew {added / 2**20:.0f} MiB for a {r['share'] / 2**20:.0f} MiB share"
