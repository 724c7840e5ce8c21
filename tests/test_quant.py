"""Weight-only int8 and int4, quantized by each stage as it loads: the same as the same quantized
model in one process, the plan's bytes match what stages hold, SmolLM2's perplexity (int8 within
1%, int4 within 10%), refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TEST_DEVICE, WORKERS, torchrun
from torch_pp.errors import DeviceError, OptionsError
from torch_pp.model.quant import KERNEL_ROWS, Int4Linear, Int8Linear, check_supported, dense_rows, kernel_dtype
from torch_pp.options import StartOptions


def test_int8_linear_multiplies_by_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True)
    q = Int8Linear.replacing(linear)
    q.set_weight(linear.weight.detach(), device=torch.device("cpu"), dtype=torch.float32)
    x = torch.randn(2, 5, 64)
    want = x.to(torch.bfloat16).float() @ q.dequantized().T + linear.bias  # the CPU kernel runs in bf16
    assert torch.allclose(q(x), want, rtol=1e-2, atol=1e-2)
    rel = (q.dequantized() - linear.weight).abs().max() / linear.weight.abs().max()
    # half a step of the largest channel, plus bf16's rounding of the scale and of the product
    assert 0 < rel < 0.5 / 127 + 2 * 2**-8
    assert q.weight.dtype == torch.int8 and q.weight.shape == (96, 64) and q.scales.shape == (96,)


def test_int4_linear_holds_4_bit_groups_in_the_kernels_layout():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    q = Int4Linear.replacing(linear)
    q.set_weight(linear.weight.detach(), device=torch.device("cpu"), dtype=torch.float32)
    assert q.group_size == 32 and q.scales_and_zeros.shape == (4, 64, 2)
    w, deq = linear.weight.detach(), q.dequantized()
    # Each group of 32 inputs holds at most 16 distinct values, spaced one scale apart...
    groups = deq.reshape(64, 4, 32)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 16
    # ...so the error is at most half a step of that group's range (bf16 scales add a little).
    step = (w.reshape(64, 4, 32).amax(-1) - w.reshape(64, 4, 32).amin(-1)) / 15
    assert ((deq - w).abs().reshape(64, 4, 32).amax(-1) <= 0.5 * step * 1.05 + 1e-3).all()
    x = torch.randn(3, 128)
    assert torch.allclose(q(x), x.to(torch.bfloat16).float() @ deq.T, rtol=2e-2, atol=2e-2)
    # a layer the kernels cannot take stays dense (see quantizable); the class refuses it outright
    with pytest.raises(DeviceError, match="divisible by 32"):
        Int4Linear(100, 64, bias=None)


def test_float32_models_run_the_cpu_kernels_in_bfloat16():
    # PyTorch's CPU weight-only kernels are fast for bf16 activations only (model.quant.kernel_dtype)
    assert kernel_dtype(torch.device("cpu"), torch.float32, "int8") == torch.bfloat16
    assert kernel_dtype(torch.device("cpu"), torch.bfloat16, "int4") == torch.bfloat16
    assert kernel_dtype(torch.device("cuda"), torch.float16, "int4") == torch.bfloat16
    assert kernel_dtype(torch.device("mps"), torch.float16, "int4") == torch.float16


@pytest.mark.parametrize("layer", [Int8Linear, Int4Linear])
def test_a_prefill_and_a_decode_step_multiply_by_the_same_weight(layer):
    """On TORCH_PP_TEST_DEVICE: many rows may take the dense path (dequantized on the fly), a few the
    kernel; both must multiply by the same weight, the one the kernel holds."""
    device = torch.device(TEST_DEVICE)
    torch.manual_seed(0)
    dense = torch.randn(256, 512)
    q = layer(512, 256, bias=None)
    q.set_weight(dense, device=device, dtype=torch.bfloat16)
    x = torch.randn(KERNEL_ROWS + 36, 512, dtype=torch.bfloat16, device=device)
    many = q(x).float()
    few = torch.cat([q(x[i:i + 4]) for i in range(0, x.shape[0], 4)]).float()
    # bf16 products differ in rounding between the paths (an output is a sum of 512 terms); a
    # weight read from the wrong place would differ by the whole output
    assert (many - few).norm() / few.norm() < 1e-2, (many - few).norm() / few.norm()
    rows = dense_rows(device, q.mode)
    if rows is not None and q._dense() is not None:  # the dense path reads the packed layout right
        assert torch.allclose(q._dense().float(), q.dequantized(), rtol=1e-2, atol=1e-2)
    err = (q.dequantized().cpu() - dense).norm() / dense.norm()
    assert err < {"int8": 0.01, "int4": 0.12}[q.mode], err


def test_dense_path_rules():
    assert dense_rows(torch.device("cpu"), "int4") is None  # the CPU kernels are fast at any size in bf16
    assert dense_rows(torch.device("cuda"), "int8") == 0  # CUDA's int8 kernel is slow even for one row
    assert dense_rows(torch.device("cuda"), "int4") == dense_rows(torch.device("mps"), "int8") == KERNEL_ROWS


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_device_whose_kernel_gives_no_numbers_is_refused(mode):
    # the meta device runs every kernel without computing anything: the probe's product is checked
    with pytest.raises(DeviceError, match=f"--quantize {mode} cannot run on meta in float32"):
        check_supported(mode, device=torch.device("meta"), dtype=torch.float32)


def test_local_pipeline_workers_quantize_too(tiny_models):
    import torch_pp

    sizes = {}
    for mode in (None, "int4"):
        with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False, quantize=mode) as pipe:
            sizes[mode] = [s["weight_bytes"] for s in pipe.stats()]
            out = pipe.model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert out.shape == (1, 7)
    assert sizes["int4"][1] < 0.35 * sizes[None][1], sizes  # the worker's layers: 4.5 of 32 bits per linear weight


def test_doctor_checks_the_quantization_on_every_rank():
    run = torchrun(2, ["torch_pp", "doctor", "--quantize", "int4", "--output", "json"], module=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert [n["quantize"] for n in report["nodes"]] == [{"mode": "int4", "dtype": "float32", "refused": None}] * 2
    assert report["problems"] == []


def test_unknown_modes_are_refused():
    with pytest.raises(OptionsError, match="unsupported quantization 'int3'"):
        StartOptions(quantize="int3")
    with pytest.raises(DeviceError, match="unknown quantization"):
        check_supported("int3", device=torch.device("cpu"), dtype=torch.float32)
    check_supported("int8", device=torch.device("cpu"), dtype=torch.bfloat16)  # has the kernel: no error
    check_supported("int4", device=torch.device("cpu"), dtype=torch.float32)


def test_quantized_pipelines_equal_quantized_models_and_keep_perplexity(tiny_models, torch_pp_cache, tmp_path):
    os.environ["TORCH_PP_CACHE"] = str(torch_pp_cache)
    from torch_pp.default_model import ensure_default_model

    smol = ensure_default_model(progress=False)
    run = torchrun(2, [str(WORKERS / "quant_worker.py"), str(smol), str(tiny_models["llama"]), str(tiny_models["qwen3_moe"])],
                   env={"OUT": str(tmp_path), "TORCH_PP_CACHE": str(torch_pp_cache)}, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads((tmp_path / "quant.json").read_text())
    for name in ("llama/int8", "qwen3_moe/int8", "llama/int4", "qwen3_moe/int4"):
        m = r[name]
        assert m["quantized_modules"] > 0 and m["same_tokens"] and m["logits_max_diff"] <= 1e-4, (name, m)
        for held, planned in zip(m["held"], m["planned"]):
            assert abs(held - planned) <= 0.05 * held, m  # plan --quantize agrees with the stages
    ppl = r["perplexity"]
    print("SmolLM2 perplexity over 2048 tokens:", ppl)
    for mode, answers in r["answers"].items():
        print(f"{mode} answers:", *answers, sep="\n  ")
    assert ppl["int8"] <= 1.01 * ppl["float32"], ppl
    assert ppl["int4"] <= 1.10 * ppl["float32"], ppl
    assert all(len(a.split()) >= 3 for answers in r["answers"].values() for a in answers), r["answers"]
    assert "Paris" in r["answers"]["int4"][0], r["answers"]["int4"]
