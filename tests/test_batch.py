"""Continuous batching (``rank0.batch``): row moves of a KV cache, a fixed join/leave schedule on
1-4 real stages equal to each request alone (greedy and seeded sampling) and bit-identical
across stage counts, ``generate_many``, and the families that cannot batch refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import WORKERS, torchrun
from tiny_models import tiny_config
from torch_pp.errors import OptionsError, StageError
from torch_pp.model import rows
from torch_pp.model.stage import StageRunner
from torch_pp.rank0.batch import Batcher
from torch_pp.rank0.batches import default_batches
from torch_pp.rank0.turn import DeviceTurn


def _cache(batch: int, length: int, *, layers: int = 2, seed: int = 0) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for idx in range(layers):
        cache.update(torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g), idx)
    return cache


def test_a_row_move_joins_shifted_rows_and_trims_shared_padding():
    batch, joiner = _cache(2, 5), _cache(1, 8, seed=1)
    old = [(batch.layers[i].keys.clone(), joiner.layers[i].keys.clone()) for i in range(2)]
    parts = [rows.Part(batch, (0, 1), 3), rows.Part(joiner, (0,), 0)]
    assert rows.moved_length(parts, [5, 8]) == 8
    rows.move_rows(batch, parts)
    for i, (b, j) in enumerate(old):
        keys = batch.layers[i].keys
        assert keys.shape == (3, 2, 8, 4)
        assert torch.equal(keys[:2, :, :3], torch.zeros(2, 2, 3, 4)) and torch.equal(keys[:2, :, 3:], b)
        assert torch.equal(keys[2], j[0])
    # Row 2 (the joiner) leaves: the three columns of padding every remaining row has go too.
    rows.move_rows(batch, [rows.Part(batch, (1, 0), -3)])
    assert batch.get_seq_length() == 5 and torch.equal(batch.layers[0].keys, old[0][0][[1, 0]])
    with pytest.raises(ValueError, match="end at different columns"):
        rows.moved_length([rows.Part(batch, (0,), 0), rows.Part(joiner, (0,), 0)], [5, 8])
    with pytest.raises(ValueError, match="at least one row"):
        rows.Part(batch, (), 0)


def test_a_stage_moves_its_lanes_rows_and_names_a_lane_it_lacks():
    layers = {2: torch.nn.Identity(), 3: torch.nn.Identity()}
    runner = StageRunner(layers, tiny_config("llama"))
    a, b = DynamicCache(config=runner.config), DynamicCache(config=runner.config)
    for cache, (n, length) in ((a, (2, 6)), (b, (1, 4))):
        for idx in layers:
            cache.update(torch.ones(n, 2, length, 4), torch.ones(n, 2, length, 4), idx)
    runner.caches = {1: (a, 6), 2: (b, 4)}
    runner.move_rows(1, [rows.Part(1, (1,), 0), rows.Part(2, (0,), 2)])
    cache, length = runner.caches[1]
    assert length == 6 and 2 not in runner.caches  # the joined lane is gone: its rows live in lane 1
    assert cache.layers[2].keys.shape == (2, 2, 6, 4) and torch.equal(cache.layers[3].keys[1, :, :2], torch.zeros(2, 2, 4))
    with pytest.raises(StageError, match="holds no KV cache of lane 9"):
        runner.move_rows(1, [rows.Part(9, (0,), 0)])


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_families_are_refused_with_the_reason(arch):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with pytest.raises(OptionsError, match="sliding-window|other than full attention"):
        Batcher(model, turn=DeviceTurn(), move_rows=rows.move_rows)


def test_two_batches_only_where_no_two_stages_share_an_accelerator():
    cpu = [{"host": "a", "device": "cpu"}, {"host": "a", "device": "cpu"}]
    assert default_batches(cpu) == 2 and default_batches(cpu[:1]) == 1
    assert default_batches([{"host": "a", "device": "cuda:0"}, {"host": "a", "device": "cuda:1"}]) == 2
    assert default_batches([{"host": "a", "device": "cuda:0"}, {"host": "a", "device": "cuda:0"}]) == 1
    assert default_batches([{"host": "a", "device": "mps"}, {"host": "b", "device": "mps"}]) == 2


@pytest.mark.parametrize("arch,counts", [("llama", (1, 2, 3, 4)), ("qwen3", (1, 2))])
def test_a_join_and_leave_schedule_equals_each_request_alone_on_1_to_4_stages(tiny_models, tmp_path, arch, counts):
    reports, logits = {}, {}
    for stages in counts:
        # One thread per process in every stage count: the same kernels, so logits compare bit for bit.
        # Two stages split the LM head; three keep every lane in preallocated slots (graphs=True,
        # eager on a CPU), whose rows move as a dynamic cache's do.
        run = torchrun(stages, [str(WORKERS / "batch_worker.py"), str(tiny_models[arch])], timeout=240,
                       env={"OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "SPLIT": "1" if stages == 2 else "0",
                            "GRAPHS": "1" if stages == 3 else "0"})
        assert run.returncode == 0, run.stderr[-3000:]
        reports[stages] = r = json.loads((tmp_path / f"batch{stages}.json").read_text())
        assert r["greedy"] == [True] * 6, (stages, r)
        assert r["sampled"] == [True, True], (stages, r)
        assert r["finish"] == ["length"] * 8
        assert r["interleaved"] == [4, 0, 1], r  # 3 decode steps (and the first token) while the long prompt was prefilled
        assert r["figures"]["steps"] > 10 and 1.5 < r["figures"]["mean_rows"] < 6, r["figures"]
        assert r["figures"]["prefill_s"] > 0 and r["figures"]["decode_s"] > 0, r["figures"]
        assert r["many_order"] == list(range(6)) and r["many"] and r["first_of_many"], r
        assert r["kv_lanes"] == [0] * (stages - 1), r  # no row or lane left on any stage
        if stages == 3:
            assert all(n >= 3 for n in r["slots"]), r["slots"]
        logits[stages] = torch.load(tmp_path / f"logits{stages}.pt")
    if 3 in counts:
        # Slots attend over a masked bucket of positions (``model.graphs``), not over exactly the
        # positions written: one process with slots is the bit-for-bit reference for them.
        run = torchrun(1, [str(WORKERS / "batch_worker.py"), str(tiny_models[arch])], timeout=240,
                       env={"OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "GRAPHS": "1", "TAG": "slots"})
        assert run.returncode == 0, run.stderr[-3000:]
        slotted = torch.load(tmp_path / "logits1slots.pt")
        assert all(torch.equal(a, b) for a, b in zip(slotted, logits[3])), "3 stages differ from one process (slots)"
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(slotted, logits[1]))
    for stages in counts[1:]:
        if stages != 3:
            assert all(torch.equal(a, b) for a, b in zip(logits[1], logits[stages])), f"{stages} stages differ from one process"
