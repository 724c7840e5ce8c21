"""Placement by memory or compute and the `torch_pp plan` preview (mostly pure: no weights)."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

from conftest import ROOT, torchrun
from tiny_models import ARCHS, tiny_config
from torch_pp.placement.plan import PlanError, parse_layers
from torch_pp.options import parse_bytes
from torch_pp.placement.balance import choose_plan, compute_plan, measured_plan
from torch_pp.placement.sizing import ModelSizes, head_split, memory_plan, model_sizes, stage_needs

GiB = 2**30


@pytest.fixture(scope="module")
def llama():
    return model_sizes(tiny_config("llama", layers=12))


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_match_the_real_model(arch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers=4)
    sizes = model_sizes(config)
    model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert sum(sizes.layer_params) + sizes.rank0_params == total, arch
    head = model.get_output_embeddings().weight.numel()
    assert sizes.head_params == head


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_sizing_matches_the_cache_transformers_fills(arch):
    """Per layer, the planned KV bytes bound what transformers' own cache holds after a prompt
    longer than the sliding window, by at most one token (it keeps window - 1)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    config = tiny_config(arch, layers=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    cache, tokens = DynamicCache(config=config), 40  # the tiny windows are 16
    with torch.no_grad():
        model(torch.randint(3, 200, (1, tokens)), past_key_values=cache, use_cache=True)
    held = [layer.keys.numel() + layer.values.numel() for layer in cache.layers]
    sizes = model_sizes(config)
    planned = [kv * (min(tokens, win) if win else tokens) for kv, win in zip(sizes.kv_elems_per_token, sizes.kv_window)]
    for i, (p, h, kv) in enumerate(zip(planned, held, sizes.kv_elems_per_token)):
        assert 0 <= p - h <= kv, f"{arch} layer {i}: planned {p} elements, the cache holds {h}"


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


def smollm2_shaped():
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def test_compute_plan_gives_rank0_fewer_layers_for_its_head():
    sizes = model_sizes(smollm2_shaped())
    assert sizes.head_params == 49152 * 576  # tied: the head is the embedding matrix, multiplied every token
    assert compute_plan(sizes, num_stages=1).ranges == ((0, 30),)
    # head = 8.0 layers of work: (8 + 11) vs 19 layers
    assert compute_plan(sizes, num_stages=2).ranges == ((0, 11), (11, 30))


def test_the_head_is_split_automatically_only_where_it_pays():
    sizes = model_sizes(smollm2_shaped())
    assert sizes.head_rows == 49152 and sizes.head_cut == 0
    cpus = dict(num_stages=2, devices=["cpu", "cpu"], wanted=None)
    split = head_split(sizes, dtype="float32", **cpus)
    assert split.head_cut == 24576 and split.tail_params == 24576 * 576  # 56.6 MB of float32 rows on the last stage
    assert head_split(sizes, dtype="bfloat16", **cpus).head_cut == 24576  # 28 MB: still over 1 ms of a CPU's reads
    # Accelerators multiply such a part in well under the extra message's cost; one stage has no one to split with.
    assert head_split(sizes, dtype="float32", num_stages=2, devices=["cpu", "cuda:0"], wanted=None).head_cut == 0
    assert head_split(sizes, dtype="float32", num_stages=2, devices=["mps", "mps"], wanted=None).head_cut == 0
    assert head_split(sizes, dtype="float32", num_stages=1, devices=["cpu"], wanted=True).head_cut == 0
    assert head_split(sizes, dtype="float32", num_stages=2, devices=["cuda:0", "cuda:1"], wanted=True).head_cut == 24576
    assert head_split(sizes, dtype="float32", wanted=False, num_stages=2, devices=["cpu", "cpu"]).head_cut == 0
    # A small head is not worth the message: the tiny test models' 256 rows.
    tiny = model_sizes(tiny_config("llama"))
    assert head_split(tiny, dtype="float32", **cpus).head_cut == 0
    assert head_split(tiny, dtype="float32", num_stages=3, devices=["cpu"] * 3, wanted=True).head_cut == 128


def test_a_split_head_moves_its_rows_to_the_last_stage():
    sizes = model_sizes(smollm2_shaped())
    split = head_split(sizes, dtype="float32", num_stages=3, devices=["cpu"] * 3, wanted=True)
    plan = parse_layers("0:10,10:20,20:30", num_layers=30)
    whole, halves = (stage_needs(s, plan, dtype="float32", context=128, batch=1) for s in (sizes, split))
    assert [h.weight_bytes - w.weight_bytes for w, h in zip(whole, halves)] == [0, 0, 24576 * 576 * 4]
    # rank 0 keeps the embedding (the tied head's matrix) whole; work per token is what moves
    assert compute_plan(split, num_stages=2).ranges == ((0, 15), (15, 30))
    assert memory_plan(split, available=[8 * GiB] * 2, dtype="float32", context=128, batch=1, reserve=0).ranges[1][0] < 30


def test_a_head_that_cannot_be_split_is_refused_when_asked():
    config = tiny_config("llama")
    config.vocab_size = 100  # fewer than two blocks of rows
    sizes = model_sizes(config)
    with pytest.raises(PlanError, match="split_head=True"):
        head_split(sizes, dtype="float32", num_stages=2, devices=["cpu", "cpu"], wanted=True)
    assert head_split(sizes, dtype="float32", num_stages=2, devices=["cpu", "cpu"], wanted=None).head_cut == 0


def random_splits(seed: int):
    """30 random models and stage counts: (rng, layers, stages, each layer's work)."""
    rng = random.Random(seed)
    for _ in range(30):
        n = rng.randint(3, 9)
        stages = min(rng.randint(1, 3), n)
        yield rng, n, stages, tuple(rng.randint(1, 50) for _ in range(n))


def best_split(worst, n: int, stages: int) -> float:
    """The smallest ``worst(bounds)`` over every contiguous split, by brute force."""
    return min(worst((0, *cuts, n)) for cuts in itertools.combinations(range(1, n), stages - 1))


def test_compute_plan_is_the_best_contiguous_split():
    for rng, n, stages, cost in random_splits(0):
        sizes = ModelSizes(cost, 0, (0,) * n, (None,) * n, layer_active_params=cost, head_params=rng.randint(0, 80))

        def worst(bounds):
            return max(sum(cost[a:b]) + (sizes.head_params if r == 0 else 0) for r, (a, b) in enumerate(zip(bounds, bounds[1:])))

        plan = compute_plan(sizes, num_stages=stages)
        assert worst((0, *(r[1] for r in plan.ranges))) == best_split(worst, n, stages), (cost, sizes.head_params, plan)


def test_measured_plan_is_the_best_split_under_the_measured_rates():
    for rng, n, stages, work in random_splits(1):
        sizes = ModelSizes(work, 0, (0,) * n, (None,) * n, layer_active_params=work)
        cuts = sorted(rng.sample(range(1, n), stages - 1))
        plan = parse_layers(",".join(f"{a}:{b}" for a, b in zip([0, *cuts], [*cuts, n])), num_layers=n)
        rate = [rng.uniform(0.5, 3.0) for _ in range(stages)]  # seconds per unit of work: machines differ
        fixed = [rng.uniform(0, 40) for _ in range(stages)]
        layers = [rate[r] * sum(work[a:b]) for r, (a, b) in enumerate(plan.ranges)]

        def worst(bounds):
            return max(fixed[r] + rate[r] * sum(work[a:b]) for r, (a, b) in enumerate(zip(bounds, bounds[1:])))

        got = measured_plan(sizes, plan, occupied_s=[f + lay for f, lay in zip(fixed, layers)], layers_s=layers)
        assert got.num_layers == n and len(got.ranges) == stages
        assert worst((0, *(r[1] for r in got.ranges))) == pytest.approx(best_split(worst, n, stages)), (work, rate, fixed, got)


def test_measured_plan_moves_layers_to_the_faster_machine_and_off_a_busy_rank0():
    sizes = model_sizes(smollm2_shaped())
    plan = compute_plan(sizes, num_stages=2)  # 0:11, 11:30
    # Same speed per layer; rank 0's head and bookkeeping measured at 44 ms, not the 8 layers' worth counted.
    same = measured_plan(sizes, plan, occupied_s=[0.085, 0.082], layers_s=[0.041, 0.081])
    assert same.ranges == ((0, 11), (11, 30))
    # Stage 1 on a machine half as fast per layer: it gets fewer layers.
    slow = measured_plan(sizes, plan, occupied_s=[0.085, 0.163], layers_s=[0.041, 0.162])
    assert slow.ranges[0][1] > 11
    # Rank 0's fixed costs twice as large: rank 0 gets fewer layers.
    busy = measured_plan(sizes, plan, occupied_s=[0.129, 0.082], layers_s=[0.041, 0.081])
    assert busy.ranges[0][1] < 11


def test_measured_plan_refuses_what_cannot_be_a_measurement():
    sizes = model_sizes(smollm2_shaped())
    plan = compute_plan(sizes, num_stages=2)
    with pytest.raises(PlanError, match="plan has 2"):
        measured_plan(sizes, plan, occupied_s=[1.0], layers_s=[1.0])
    with pytest.raises(PlanError, match="decode window"):
        measured_plan(sizes, plan, occupied_s=[1.0, 1.0], layers_s=[0.0, 1.0])  # a stage that never ran its layers
    with pytest.raises(PlanError, match="decode window"):
        measured_plan(sizes, plan, occupied_s=[1.0, 1.0], layers_s=[2.0, 1.0])  # more time in layers than occupied


def test_compute_plan_counts_only_the_active_experts():
    config = tiny_config("deepseek_v3", layers=4)  # 4 routed experts, 2 per token, layer 0 dense
    sizes = model_sizes(config)
    assert sizes.layer_active_params[0] == sizes.layer_params[0]
    experts = 4 * (64 * 64 + 64 * 32)  # gate_up_proj + down_proj of the tiny config
    assert sizes.layer_params[1] - sizes.layer_active_params[1] == experts // 2


def test_choose_plan_names_the_choices():
    with pytest.raises(PlanError, match="memory, compute, even"):
        choose_plan(model_sizes(tiny_config("llama", layers=4)), num_stages=2, balance="speed", dtype="float32",
                    context=16, batch=1)


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


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True), ("deepseek_v3", False), ("mixtral", False),
                                        ("gemma2", True), ("qwen3_moe", False), ("phi3", False)])
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


def test_plan_cli_compute_balance(tmp_path):
    smollm2_shaped().save_pretrained(tmp_path)
    out = plan_cli(tmp_path, "--memory", "4GiB,4GiB", "--dtype", "float32", "--balance", "compute", "--output", "json")
    assert out.returncode == 0, out.stderr
    assert [s["layers"] for s in json.loads(out.stdout)["stages"]] == [[0, 11], [11, 30]]
    split = plan_cli(tmp_path, "--memory", "4GiB,4GiB", "--dtype", "float32", "--balance", "compute", "--split-head",
                     "--output", "json")
    stages = json.loads(split.stdout)["stages"]
    assert [s["layers"] for s in stages] == [[0, 15], [15, 30]]
    assert stages[1]["weight_bytes"] == 15 * model_sizes(smollm2_shaped()).layer_params[0] * 4 + 24576 * 576 * 4


def test_budget_failure_before_loading_under_torchrun(tiny_models):
    run = torchrun(2, ["torch_pp", "generate", "--model", str(tiny_models["llama"]), "--prompt", "hi",
                       "--max-memory", "1MiB", "--no-progress"], module=True, timeout=90)
    assert run.returncode != 0
    assert run.stderr.count("the model does not fit this cluster") == 1, run.stderr[-3000:]
    assert "headroom" in run.stderr and "NO" in run.stderr
    assert "load the model" not in run.stderr  # failed while placing, before any weight was read


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_compute_plan_counts_active_experts_of_every_moe_family(arch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers=4)  # 4 routed experts, 2 per token
    sizes = model_sizes(config)
    model = AutoModelForCausalLM.from_config(config)
    routed = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("model.layers.1.") and ".experts." in n and "shared_expert" not in n)
    assert routed > 0
    assert sizes.layer_params[1] - sizes.layer_active_params[1] == routed // 2


def test_plan_cli_counts_quantized_layers(tmp_path):
    folder = write_config(tmp_path / "llama", "llama")
    plain, int8, int4 = (json.loads(plan_cli(folder, "--memory", "3GiB,1.5GiB", "--dtype", "float16", "--output", "json",
                                             *q).stdout) for q in ([], ["--quantize", "int8"], ["--quantize", "int4"]))
    plain, int8, int4 = (r["stages"][1]["weight_bytes"] for r in (plain, int8, int4))  # rank 1: decoder layers only
    assert plain / 2 < int8 < plain * 0.6  # one byte per linear weight, plus scales and norms
    # half a byte per linear weight plus a 2-byte scale and zero per 32 inputs: 0.625 of int8's byte
    assert plain / 4 * 1.2 < int4 < plain / 4 * 1.35
