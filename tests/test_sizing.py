"""Placement by memory and the `torch_pp plan` preview (pure: no weights, no processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, torchrun
from tiny_models import tiny_config
from torch_pp.plan import PlanError, parse_layers
from torch_pp.sizing import memory_plan, model_sizes, parse_bytes, stage_needs

GiB = 2**30


@pytest.fixture(scope="module")
def llama():
    return model_sizes(tiny_config("llama", layers=12))


def test_counts_match_the_real_model():
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2", "deepseek_v3"):
        config = tiny_config(arch, layers=4)
        sizes = model_sizes(config)
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())  # tied weights counted once
        assert sum(sizes.layer_params) + sizes.rank0_params == total, arch


def test_moe_layers_differ_from_dense():
    sizes = model_sizes(tiny_config("deepseek_v3", layers=4))  # first_k_dense_replace=1
    assert sizes.layer_params[0] != sizes.layer_params[1]
    assert len(set(sizes.layer_params[1:])) == 1


def test_tied_embeddings_count_once():
    tied = model_sizes(tiny_config("qwen2"))  # tie_word_embeddings=True
    untied = model_sizes(tiny_config("llama"))
    vocab, hidden = 256, 64
    assert untied.rank0_params == 2 * vocab * hidden + hidden
    assert tied.rank0_params == vocab * hidden + hidden


def test_equal_memory_gives_equal_layer_bytes(llama):
    plan = memory_plan(llama, available=[8 * GiB, 8 * GiB], dtype="float32", context=128, batch=1, reserve=0)
    assert plan.ranges == ((0, 6), (6, 12))


def test_split_follows_memory(llama):
    plan = memory_plan(llama, available=[2 * GiB, 6 * GiB], dtype="float32", context=128, batch=1, reserve=0)
    counts = [e - s for s, e in plan.ranges]
    assert counts == [3, 9]
    plan = memory_plan(llama, available=[6 * GiB, 2 * GiB], dtype="float32", context=128, batch=1, reserve=0)
    assert [e - s for s, e in plan.ranges] == [9, 3]


def test_rank0_pays_for_embedding_and_head():
    # A huge vocabulary makes rank 0's embedding and head weigh like several layers.
    config = tiny_config("llama", layers=12)
    config.vocab_size = 64 * 1024
    sizes = model_sizes(config)
    # Memories close to the model's size: rank 0's ~33 MB of embedding and head leave it less room.
    plan = memory_plan(sizes, available=[40 * 2**20, 40 * 2**20], dtype="float32", context=128, batch=1, reserve=0)
    assert plan.ranges[0][1] <= 3
    needs = stage_needs(sizes, plan, dtype="float32", context=128, batch=1, reserve=0)
    assert needs[0].weight_bytes > sum(sizes.layer_params[:plan.ranges[0][1]]) * 4


def test_kv_cache_counts_context_batch_and_window(llama):
    plan = parse_layers("0:6,6:12", num_layers=12)
    a = stage_needs(llama, plan, dtype="float16", context=1000, batch=1)
    b = stage_needs(llama, plan, dtype="float16", context=2000, batch=3)
    assert b[0].kv_bytes == 6 * a[0].kv_bytes
    # per token per layer: 2 (K,V) x 2 kv heads x 16 head dim x 2 bytes
    assert a[0].kv_bytes == 6 * 1000 * 2 * 2 * 16 * 2
    mistral = model_sizes(tiny_config("mistral", layers=2))  # sliding window 16
    m = stage_needs(mistral, parse_layers("0:2", num_layers=2), dtype="float16", context=4096, batch=1)
    assert m[0].kv_bytes == 2 * 16 * 2 * 2 * 16 * 2


def test_infeasible_cluster_is_reported(llama):
    plan = memory_plan(llama, available=[1 * 2**20, 1 * 2**20], dtype="float32", context=128, batch=1, reserve=0)
    needs = stage_needs(llama, plan, dtype="float32", context=128, batch=1, available=[2**20, 2**20], reserve=0)
    assert not any(s.fits for s in needs)
    with pytest.raises(PlanError):
        memory_plan(llama, available=[GiB] * 13, dtype="float32", context=128, batch=1)


def test_parse_bytes():
    assert parse_bytes("128GiB") == 128 * GiB and parse_bytes("96GB") == 96 * 10**9 and parse_bytes("512") == 512
    with pytest.raises(ValueError):
        parse_bytes("lots")


def write_config(path, arch, **over):
    config = tiny_config(arch, layers=8)
    for k, v in over.items():
        setattr(config, k, v)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "torch_pp", "plan", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True), ("deepseek_v3", False)])
def test_plan_cli_from_config_alone(tmp_path, arch, tied):
    folder = write_config(tmp_path / arch, arch)
    out = plan_cli(folder / "config.json", "--memory", "3GiB,1.5GiB", "--dtype", "float32", "--output", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["fits"] and doc["model_type"] == arch
    stages = doc["stages"]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 8 and stages[0]["layers"][1] == stages[1]["layers"][0]
    assert all(s["headroom_bytes"] == s["available_bytes"] - s["total_bytes"] for s in stages)
    text = plan_cli(folder, "--memory", "3GiB,1.5GiB", "--dtype", "int8")
    assert text.returncode == 0 and "fits: yes" in text.stdout and "stage" in text.stdout


def test_plan_cli_answers_the_deepseek_67b_question(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 95,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 102400, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    fp16 = json.loads(plan_cli(path, "--memory", "128GiB,128GiB", "--dtype", "float16", "--output", "json").stdout)
    assert fp16["fits"] and 67e9 < fp16["parameters"] < 68e9
    small = plan_cli(path, "--memory", "64GiB,64GiB", "--dtype", "float16")
    assert small.returncode == 3 and "fits: NO" in small.stdout
    int8 = plan_cli(path, "--memory", "64GiB,64GiB", "--dtype", "int8")
    assert int8.returncode == 0 and "fits: yes" in int8.stdout


def test_budget_failure_before_loading_under_torchrun(tiny_models):
    run = torchrun(2, ["torch_pp", "generate", "--model", str(tiny_models["llama"]), "--prompt", "hi",
                       "--max-memory", "1MiB", "--no-progress"], module=True, timeout=90)
    assert run.returncode != 0
    assert run.stderr.count("the model does not fit this cluster") == 1, run.stderr[-3000:]
    assert "headroom" in run.stderr and "NO" in run.stderr
    assert "load the model" not in run.stderr  # failed while placing, before any weight was read
