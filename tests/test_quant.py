"""Weight-only int8, quantized by each stage as it loads: the same as the same int8 model in one
process, the plan's bytes match what stages hold, SmolLM2's perplexity within 1%, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import WORKERS, torchrun
from torch_pp.errors import DeviceError, OptionsError
from torch_pp.model.quant import Int8Linear, check_supported
from torch_pp.options import StartOptions


def test_int8_linear_multiplies_by_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True)
    q = Int8Linear.replacing(linear)
    q.set_weight(linear.weight.detach(), device=torch.device("cpu"), dtype=torch.float32)
    x = torch.randn(2, 5, 64)
    want = x @ q.dequantized().T + linear.bias
    assert torch.allclose(q(x), want, atol=1e-5)
    rel = (q.dequantized() - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < rel < 1 / 127  # half a step of the largest channel at most
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 64) and q.scales.shape == (96,)


def test_unknown_modes_are_refused():
    with pytest.raises(OptionsError, match="unsupported quantization 'int3'"):
        StartOptions(quantize="int3")
    with pytest.raises(DeviceError, match="unknown quantization"):
        check_supported("int3", device=torch.device("cpu"), dtype=torch.float32)
    check_supported("int8", device=torch.device("cpu"), dtype=torch.bfloat16)  # has the kernel: no error


def test_int8_pipeline_equals_int8_model_and_keeps_perplexity(tiny_models, torch_pp_cache, tmp_path):
    os.environ["TORCH_PP_CACHE"] = str(torch_pp_cache)
    from torch_pp.default_model import ensure_default_model

    smol = ensure_default_model(progress=False)
    run = torchrun(2, [str(WORKERS / "quant_worker.py"), str(smol), str(tiny_models["llama"]), str(tiny_models["qwen3_moe"])],
                   env={"OUT": str(tmp_path), "TORCH_PP_CACHE": str(torch_pp_cache)}, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads((tmp_path / "quant.json").read_text())
    for name in ("llama", "qwen3_moe"):
        m = r[name]
        assert m["int8_modules"] > 0 and m["same_tokens"] and m["logits_max_diff"] <= 1e-4, m
        for held, planned in zip(m["held"], m["planned"]):
            assert abs(held - planned) <= 0.05 * held, m  # plan --quantize agrees with the stages
    ppl = r["perplexity"]
    print("SmolLM2 perplexity over 2048 tokens:", ppl, "\nint8 answers:", *r["answers"], sep="\n")
    assert ppl["int8"] <= 1.01 * ppl["float32"], ppl
    assert all(len(a.split()) >= 3 for a in r["answers"]), r["answers"]
