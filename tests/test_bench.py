"""The benchmarks' machinery on small models: alternating turns, the same tokens on both sides, every figure present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, free_port
from tiny_models import write_tiny_model


def bench_decode(model, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """bench/bench_decode.py on ``model`` with ``args``: the finished run and its JSON result."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--model", str(model), *args, "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_bench_decode_alternates_and_agrees(tiny_models, tmp_path):
    run, result = bench_decode(tiny_models["llama"], tmp_path, "--new-tokens", "6", "--reps", "3")
    assert result["same_tokens"] is True
    assert len(result["decode_ratio_per_round"]) == 3 and all(r > 0 for r in result["decode_ratio_per_round"])
    assert [s["layers"] for s in result["pipeline"]["stages"]] == [[0, 2], [2, 4]]
    assert result["pipeline"]["per_boundary_ms"] > 0 and 0 < result["pipeline"]["communication_share"] < 1
    assert "decode ratio pipeline/HF" in run.stdout
    # The floor: a bare pipeline under torch_pp's plan, its tokens among the same tokens above.
    floor = result["floor"]
    assert floor["plan"] == "0:2,2:4" and floor["decode_tokens_per_s"] > 0
    assert floor["decode_ratio_floor_over_hf"] > 0 and floor["decode_ratio_pipeline_over_floor"] > 0
    assert "pipeline/floor (torch_pp's own)" in run.stdout


def test_bench_decode_leaves_the_floor_out_for_a_family_it_does_not_cover(tiny_models, tmp_path):
    # Also measured from outside (a 2-token run against a 20-token one), as issue 9 states the decode target.
    run, result = bench_decode(tiny_models["gemma3_text"], tmp_path, "--outside", "2,20", "--reps", "2")
    assert "floor" not in result and result["same_tokens"] is True
    assert result["decode_measured"] == "from outside: 2 vs 20 new tokens"
    assert len(result["decode_ratio_per_round"]) == 2 and all(r > 0 for r in result["decode_ratio_per_round"])
    assert result["pipeline"]["decode_tokens_per_s"] > 0 and result["baseline_hf"]["decode_tokens_per_s"] > 0
    assert "floor left out: the bare pipeline covers llama" in run.stderr


def test_perf_report_runs_on_a_folder_without_tokenizer(tiny_models, tmp_path):
    # The tiny models have neither a tokenizer nor a chat template (a random-weight test model).
    model = tiny_models["llama"]
    assert not (model / "tokenizer.json").exists() and not (model / "tokenizer_config.json").exists()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          str(ROOT / "bench" / "perf_report.py"), "--model", str(model), "--new-tokens", "4", "--long", "256",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stages"] == 2 and report["decode_tokens_per_s"] > 0 and report["lanes"] == 2
    assert report["lanes_speedup_over_one_lane"] > 0 and report["one_lane_same_batch_tokens_per_s"] > 0
    assert report["baseline_hf"]["decode_tokens_per_s"] > 0
    assert "TTFT 256-token prompt, pipelined" in run.stdout


def test_bench_lanes_reports_speedup_bound_and_same_tokens(tiny_models, tmp_path):
    out = tmp_path / "lanes.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_lanes.py"), "--model", str(tiny_models["llama"]),
                          "--batches", "4", "--tokens", "2,6", "--reps", "2", "--balance", "memory", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())["batches"]["4"]
    assert row["same_tokens"] is True
    assert row["bound"] > 0 and row["speedup"] > 0 and len(row["stage_compute_ms_per_round_2_lanes"]) == 2
    assert row["rank0_cpu_ms_per_round_2_lanes"] > 0
    assert "bound here" in run.stdout


def test_balance_measures_each_stage_and_proposes_an_even_plan(tmp_path):
    # Eleven of twelve layers on rank 0: an imbalance far beyond what another program on the
    # machine can fake in the median of three rounds (a 4-layer 3:1 split once came out inverted
    # beside the other test worker, from one round of 8 steps).
    model = write_tiny_model("llama", tmp_path / "llama12", layers=12)
    out = tmp_path / "balance.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          str(ROOT / "bench" / "balance.py"), "--model", str(model), "--layers", "0:11,11:12",
                          "--batch", "2", "--tokens", "16", "--rounds", "3", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["plan"] == "0:11,11:12" and result["rounds"] == 3
    stages = result["stages"]
    assert [s["layers"] for s in stages] == [[0, 11], [11, 12]]
    assert all(0 < s["layers_ms"] <= s["occupied_ms"] * 1.05 for s in stages)
    # Rank 0 held 11 of the 12 layers on top of its head and generate()'s bookkeeping: it was the
    # most occupied, and the proposal moves layers to stage 1 and predicts a smaller largest stage.
    assert stages[0]["occupied_ms"] > stages[1]["occupied_ms"]
    assert stages[0]["proposed_layers"][1] < 11 and result["balanced_plan"] == ",".join(f"{a}:{b}" for a, b in (s["proposed_layers"] for s in stages))
    assert max(s["predicted_ms"] for s in stages) < stages[0]["occupied_ms"]
    assert f"--layers {result['balanced_plan']}" in run.stdout


def test_balance_on_one_stage_says_there_is_nothing_to_balance(tiny_models):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
                          str(ROOT / "bench" / "balance.py"), "--model", str(tiny_models["llama"])],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    assert "nothing to balance" in run.stderr and "--nproc-per-node" in run.stderr


def test_bench_quant_reports_every_mode_with_shrinking_weights(tiny_models, tmp_path):
    out = tmp_path / "quant.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_quant.py"), "--model", str(tiny_models["llama"]),
                          "--rounds", "2", "--long", "64", "--new", "4", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert list(figures) == ["none", "int8", "int4"]
    assert all(f["decode_tokens_per_s"] > 0 and f["ttft_s"] > 0 and len(f["peak_memory_bytes"]) == 2 for f in figures.values())
    layers = [figures[m]["weight_bytes"][1] for m in ("none", "int8", "int4")]  # rank 1 holds decoder layers only
    assert layers[0] > layers[1] > layers[2], layers
    assert figures["none"]["same_tokens_as_unquantized"] is True
    assert "decode tok/s" in run.stdout


def test_bench_serve_compares_batching_with_one_lane_per_request_and_generate(torch_pp_cache, tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--clients", "1,2", "--requests", "1",
                          "--new", "4", "--rounds", "1", "--servers", "batched,lanes", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "TORCH_PP_CACHE": str(torch_pp_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    for server in ("batched", "lanes"):
        for clients in (1, 2):
            f = figures[f"{server}/{clients}"]
            assert f["tokens_per_s"] > 0 and 0 < f["ttft_p50_s"] <= f["ttft_p95_s"], (server, clients, f)
    assert figures["generate/2"]["tokens_per_s"] > 0
    assert figures["ratio/2/batched_over_lanes"] > 0 and figures["ratio/2/batched_over_generate"] > 0
    assert 0 < figures["late"]["late_ttft_s"] and figures["late"]["step_s"] > 0
    assert "TTFT p50 ms" in run.stdout


def test_a_grown_checkpoint_computes_its_source(tiny_models, tmp_path):
    """bench/inflate.py: the large shape's every matrix, the small model's logits and greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    from inflate import grow

    shape = ("llama", dict(hidden_size=128, intermediate_size=320, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=32))
    grown = grow(tiny_models["llama"], tmp_path / "grown", shape=shape, dtype="float32")
    small = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    big = AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32)
    assert big.config.num_hidden_layers == 6 and big.model.layers[0].mlp.up_proj.weight.shape == (320, 128)
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = small(ids).logits, big(ids).logits
        assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
        assert torch.equal(small.generate(ids[:1], max_new_tokens=20, do_sample=False),
                           big.generate(ids[:1], max_new_tokens=20, do_sample=False))


def test_profile_ranks_splits_each_ranks_host_time(tiny_models, tmp_path):
    """bench/profile_ranks.py: py-spy on every rank of a real 2-stage pipeline and of one process; each
    rank's time per token split into waiting, layers, hops and the rest, with the functions it is in."""
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_ranks.py"), "--model", str(tiny_models["llama"]),
                          "--new", "40", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    one, pipe = result["one_process"], result["pipeline"]
    assert len(one["ranks"]) == 1 and len(pipe["ranks"]) == 2
    assert one["ranks"][0]["wait"] == 0 and one["ranks"][0]["hops"] == 0  # nothing to wait for, no hop
    rank0, stage = pipe["ranks"]
    assert rank0["wait"] > 0 and rank0["hops"] > 0 and rank0["layers"] > 0 and rank0["host"] > 0
    assert stage["layers"] > 0 and stage["hops"] > 0 and stage["wait"] > 0
    # The split covers what was sampled: at most the step's own time per token (py-spy pauses the process).
    assert rank0["wait"] + rank0["layers"] + rank0["hops"] + rank0["host"] <= 1.2 * pipe["ms_per_token"]
    assert any("generation" in f or "modeling_llama" in f or "torch/nn" in f for f, _ in rank0["top_host"])
    assert "the pipeline's host time beyond one process's" in run.stdout


def test_bench_prefill_hop_times_a_prefills_parts_between_two_ranks(tmp_path):
    """bench/bench_prefill_hop.py: a real 2-rank Gloo run; every part of the hop timed per prompt length
    (on a CPU no device copies exist, and none is pinned)."""
    out = tmp_path / "hop.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_prefill_hop.py"), "--hidden", "256",
                          "--lengths", "16,8192", "--reps", "4", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pinned"] is False and set(result["figures"]) == {"16", "8192"}
    small, big = result["figures"]["16"], result["figures"]["8192"]
    assert big["megabytes"] == 8192 * 256 * 4 / 1e6
    # 8 MB cannot cross loopback at 50 GB/s: a timer around nothing would; the two sizes' order is left
    # out, a stage's wake-up on this VM can take longer than the 8 MB themselves.
    assert small["gloo"] > 0 and big["gloo"] > big["megabytes"] / 50 and big["host_copy"] > 0
    assert big["out_pageable"] == big["in_pageable"] == 0.0  # a CPU rank sends from where the tensor lies
    assert small["torch_pp"] > 0 and big["torch_pp"] > big["megabytes"] / 50  # torch_pp's own hop, over the same group
    assert "torch_pp's hop ms" in run.stdout


def test_prefill_spans_times_a_first_token_rank_by_rank(tiny_models, tmp_path):
    """bench/prefill_spans.py: one process and a real 2-stage run; a chunked prompt is sent as its
    chunks (rank 0's sends), a whole one in one, and the stage's layers show as its compute."""
    out = tmp_path / "spans.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_spans.py"), "--model", str(tiny_models["llama"]),
                          "--lengths", "30,200", "--chunks", "0,64", "--reps", "2", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = {(f["length"], f["chunk"]): f for f in result["pipeline"]}
    assert set(figures) == {(30, "0"), (30, "64"), (200, "0"), (200, "64")}
    for f in figures.values():
        assert f["ttft_s"] > 0 and f["over_one_process"] > 0 and len(f["ranks"]) == 2
        assert f["ranks"][1]["compute"] > 0 and f["ranks"][0]["layers"] > 0
    # 200 tokens in chunks of 64 leave rank 0 as four messages (0, 64, 128, 192), whole as one
    assert figures[(200, "64")]["ranks"][0]["sends"] - figures[(200, "0")]["ranks"][0]["sends"] == 3
    assert figures[(30, "64")]["ranks"][0]["sends"] == figures[(30, "0")]["ranks"][0]["sends"]  # shorter than two chunks: whole
    assert "first token ms" in run.stdout
