"""Captured decode steps over preallocated caches (``model.graphs``): same tokens as transformers.

On a CPU (and a Mac) a slot runs the very step a CUDA graph captures, only eagerly: these tests
check its masks, positions, reuse and spill everywhere; with ``TORCH_PP_TEST_DEVICE=cuda`` they
check the captured graphs themselves.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import torch_pp
from conftest import TEST_DEVICE
from torch_pp.errors import StartupError
from torch_pp.model import graphs
from torch_pp.model.stage import StageRunner

CAPTURED = TEST_DEVICE == "cuda"
STEPS = "graph_steps" if CAPTURED else "slot_steps"


def _reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(TEST_DEVICE).eval()


def _greedy(model, ids, new, mask=None):
    ids = ids.to(model.device)
    mask = None if mask is None else mask.to(model.device)
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False).cpu()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_slots_give_transformers_tokens_and_spill_past_the_context(tiny_models, arch):
    ref = _reference(tiny_models[arch])
    ids = torch.tensor([[1, 5, 9, 33, 7], [0, 0, 1, 8, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch_pp.local_pipeline(tiny_models[arch], stages=3, progress=False, graphs=True, context=48, dtype="float32",
                                 prefill_chunk=3) as pipe:
        # a left-padded batch, prefilled in two chunks: the padding mask is extended over the slots
        assert torch.equal(_greedy(pipe.model, ids, 30, mask), _greedy(ref, ids, 30, mask))
        batch = pipe.stats()
        # one stream of 5 + 60 tokens outgrows its 48 positions and continues in a dynamic cache
        assert torch.equal(_greedy(pipe.model, ids[:1], 60), _greedy(ref, ids[:1], 60))
        stages = pipe.stats()
    assert len(stages) == 3
    for before, after in zip(batch, stages):  # rank 0's own layers as well as the other stages'
        assert before["graphs"] == ("on" if CAPTURED else "eager")
        assert before["fused"] is CAPTURED, before  # norms and MLPs fused where captured (model.fusion)
        assert before[STEPS] == 29 and before["eager_steps"] == 0, before  # every decode step of the batch in its slot
        assert after[STEPS] - before[STEPS] == 48 - 5, after  # positions 5..47 in the slot
        assert after["eager_steps"] == 60 - 1 - (48 - 5), after  # the rest after the spill
        assert after["slots"] == 2, after  # one per batch size


def test_slots_are_reused_and_lanes_get_their_own(tiny_models):
    ref = _reference(tiny_models["llama"])
    prompts = [torch.tensor([[1, 5 + i, 9, 3 * i + 2]]) for i in range(4)]
    alone = [_greedy(ref, p, 12) for p in prompts]
    with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False, graphs=True, context=64, dtype="float32") as pipe:
        for p, want in zip(prompts, alone):  # one after another: one slot serves them all
            assert torch.equal(_greedy(pipe.model, p, 12), want)
        assert [s["slots"] for s in pipe.stats()] == [1, 1]  # rank 0's own layers' slot too
        got: dict[int, torch.Tensor] = {}

        def run(i):
            got[i] = _greedy(pipe.model, prompts[i], 12)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stages = pipe.stats()
    for i, want in enumerate(alone):
        assert torch.equal(got[i], want), f"request {i} differs when run beside the others"
    for stage in stages:
        assert 2 <= stage["slots"] <= 4, stage  # concurrent lanes never share a slot
        assert stage[STEPS] == 8 * 11 and stage["eager_steps"] == 0, stage


def test_hidden_states_of_a_slot_lane_equal_transformers(tiny_models):
    ref = _reference(tiny_models["qwen3"])
    ids = torch.tensor([[1, 5, 9, 33, 7, 8]])
    with torch_pp.local_pipeline(tiny_models["qwen3"], stages=2, progress=False, graphs=True, dtype="float32") as pipe:
        out = pipe.model.generate(ids.to(pipe.model.device), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  output_hidden_states=True, return_dict_in_generate=True)
        # rank 0's decode steps ran in its slot (replayed on CUDA): each layer's own output still recorded
        assert pipe.stats()[0][STEPS] == 3
    want = ref.generate(ids.to(ref.device), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                        output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences.cpu(), want.sequences.cpu())
    for got_step, want_step in zip(out.hidden_states, want.hidden_states):
        for a, b in zip(got_step, want_step):
            assert torch.allclose(a.cpu(), b.cpu(), atol=1e-4), (a - b).abs().max()


def test_the_default_follows_the_device(tiny_models):
    with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False) as pipe:
        pipe.model.generate(torch.tensor([[1, 5, 9]]).to(pipe.model.device), max_new_tokens=3, do_sample=False)
        stages = pipe.stats()
    for stage in stages:
        assert stage["graphs"] == ("on" if CAPTURED else "off"), stage
        if CAPTURED:
            assert stage["graph_steps"] == 2, stage


def test_a_single_stage_runs_every_layer_in_its_slots(tiny_models):
    ref = _reference(tiny_models["llama"])
    ids = torch.tensor([[1, 5, 9, 33, 7], [0, 0, 1, 8, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch_pp.local_pipeline(tiny_models["llama"], stages=1, progress=False, graphs=True, dtype="float32") as pipe:
        assert torch.equal(_greedy(pipe.model, ids, 20, mask), _greedy(ref, ids, 20, mask))
        # a cache given back continues in the same slot
        first = pipe.model(ids[:1].to(pipe.model.device), use_cache=True)
        step = pipe.model(torch.tensor([[11]], device=pipe.model.device), past_key_values=first.past_key_values)
        want = ref(torch.cat([ids[:1], torch.tensor([[11]])], dim=1).to(ref.device)).logits[:, -1]
        assert torch.allclose(step.logits[:, -1].cpu(), want.cpu(), atol=1e-5)
        (stage,) = pipe.stats()
        # a copied cache has no slot behind it: refused, naming rank 0's layers
        with pytest.raises(torch_pp.StageError, match=r"rank 0's own layers 0:4: .*out of step"):
            pipe.model(torch.tensor([[11]], device=pipe.model.device), past_key_values=copy.deepcopy(first.past_key_values))
    assert stage["graphs"] == ("on" if CAPTURED else "eager"), stage
    assert stage[STEPS] == 19 + 1 and stage["eager_steps"] == 0 and stage["slots"] == 2, stage


def test_a_family_that_cannot_use_slots_is_refused_only_when_asked(tiny_models):
    # the tiny mistral has a 16-token sliding window
    with pytest.raises(StartupError, match="sliding window"):
        torch_pp.local_pipeline(tiny_models["mistral"], stages=2, progress=False, graphs=True)
    with torch_pp.local_pipeline(tiny_models["mistral"], stages=2, progress=False) as pipe:
        assert pipe.stats()[1]["graphs"] == "off"
    assert graphs.unsupported(AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"]).config) is not None
    assert graphs.unsupported(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).config) is None


def test_a_lane_without_room_for_a_slot_runs_in_a_dynamic_cache(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    runner = StageRunner({i: model.model.layers[i] for i in (2, 3)}, model.config)
    asked: list[int] = []
    room = {"ok": True}
    runner.use_slots(max_len=32, device=torch.device("cpu"), dtype=torch.float32, capture=False,
                     room=lambda size: asked.append(size) or room["ok"])
    assert isinstance(runner._new_cache(2, 5), graphs.Slot)
    # 2 layers x keys and values x 2 sequences x 2 kv heads x 32 positions x 16 dims x 4 bytes
    assert asked == [2 * 2 * 2 * 2 * 32 * 16 * 4] == [graphs.slot_bytes(model.config, layers=2, batch=2, max_len=32,
                                                                        dtype=torch.float32)]
    room["ok"] = False
    assert isinstance(runner._new_cache(1, 5), DynamicCache)
    assert isinstance(runner._new_cache(1, 33), DynamicCache)  # a prompt longer than a slot
