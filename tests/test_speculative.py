"""Speculative decoding through the pipeline (``rank0.speculation``): transformers' own assisted
generation, with the stages' caches following rank 0's crops.

Every family, 1-4 stages, split head on and off, sliding windows, chunked and continued calls:
``test_split_equals_whole.test_assisted_generation_equals_whole``. Here: slots (the steps CUDA
captures, eagerly on a CPU), the refusal of any move back rank 0 did not ask for, a cropped
returned cache (what transformers' MPS generation hands back), the switch-off, the draft model
as a start option and in the placement (the command line: ``test_smollm2``).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import torch_pp
from conftest import TEST_DEVICE
from torch_pp.errors import StageError
from torch_pp.model.stage import StageRunner
from torch_pp.rank0.speculation import Cutoff, Proposals, Speculation
from tiny_models import write_tiny_model

CAPTURED = TEST_DEVICE == "cuda"
VERIFY = "graph_verify_steps" if CAPTURED else "slot_verify_steps"


def _reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(TEST_DEVICE).eval()


def _repeating(length: int = 6, times: int = 5) -> torch.Tensor:
    pattern = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(3))
    return torch.cat([pattern] * times, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_verification_steps_run_in_slots_and_move_back(tiny_models, arch):
    """Slots (captured on CUDA) verify proposals of any length and move back after rejections, on
    rank 0's own layers and on the other stages: transformers' tokens, and no step left eager."""
    ref = _reference(tiny_models[arch])
    ids = _repeating().to(TEST_DEVICE)
    plain = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    want = ref.generate(ids, **plain)
    with torch_pp.local_pipeline(tiny_models[arch], stages=3, progress=False, graphs=True, context=128,
                                 dtype="float32") as pipe:
        got_lookup = pipe.model.generate(ids, prompt_lookup_num_tokens=4, **plain)
        got_self = pipe.model.generate(ids, assistant_model=ref, **plain)  # every proposal accepted
        stages = pipe.stats()
    assert torch.equal(got_lookup.cpu(), want.cpu()) and torch.equal(got_self.cpu(), want.cpu())
    spec = stages[0]["speculation"]
    assert spec["proposed"] > spec["accepted"] > 0, spec
    for stage in stages:  # rank 0's own layers too
        assert stage[VERIFY] > 0 and stage["eager_steps"] == 0 and stage["rewinds"] > 0, stage


def test_a_lane_moves_back_only_when_rank_0_says_so(tiny_models):
    model = _reference(tiny_models["llama"])
    layers = {i: layer for i, layer in enumerate(model.model.layers)}
    runner = StageRunner(layers, model.config)
    hidden = torch.randn(1, 5, 64, device=TEST_DEVICE)
    args = _layer_args(model, 5, past=0)
    first = runner.forward(hidden, {i: args for i in layers}, past_len=0, use_cache=True, lane=1)
    step = _layer_args(model, 2, past=3)
    with pytest.raises(StageError, match="lane 1 out of step: this stage holds 5 tokens, rank 0 expects 3"):
        runner.forward(hidden[:, 3:], {i: step for i in layers}, past_len=3, use_cache=True, lane=1)
    again = runner.forward(hidden[:, 3:], {i: step for i in layers}, past_len=3, use_cache=True, lane=1, rewind=True)
    assert torch.allclose(again, first[:, 3:], rtol=1e-4, atol=1e-4)  # the crop left exactly positions 0..2 (fp32 rounding)
    assert runner.figures()["rewinds"] == 1
    with pytest.raises(StageError, match="holds 5 tokens, rank 0 expects 7"):  # ahead of the stage: never
        runner.forward(hidden[:, :1], {i: _layer_args(model, 1, past=7) for i in layers}, past_len=7, use_cache=True,
                       lane=1, rewind=True)


def _layer_args(model, q: int, *, past: int) -> dict:
    """What HF passes a llama decoder layer for ``q`` tokens after ``past`` cached ones."""
    pos = torch.arange(past, past + q, device=TEST_DEVICE)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, q, 64, device=TEST_DEVICE), pos)
    mask = torch.full((1, 1, q, past + q), float("-inf"), device=TEST_DEVICE).triu(past + 1)
    return {"attention_mask": mask, "position_ids": pos, "position_embeddings": (cos, sin), "use_cache": True}


def test_a_cropped_returned_cache_continues_like_transformers(tiny_models):
    """transformers' generation on MPS runs one step ahead and crops the returned cache by one
    (``DeferredStopCheck``); a crop of any returned cache moves the stages back with it."""
    ref = _reference(tiny_models["mistral"])  # a sliding window of 16: the prompt and the answer pass it
    ids = _repeating(7, 4).to(TEST_DEVICE)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True)

    def recording():  # as DeferredStopCheck makes it: the sliding layers keep what a crop needs
        cache = DynamicCache(config=ref.config)
        cache.activate_past_recording()
        return cache

    with torch_pp.local_pipeline(tiny_models["mistral"], stages=2, progress=False, dtype="float32") as pipe:
        try:
            a = ref.generate(ids, past_key_values=recording(), **kw)
        except RuntimeError as exc:  # transformers 5.17: its own sliding-window mask ignores the recorded past
            pytest.skip(f"transformers {transformers.__version__} cannot run this call itself: {exc}")
        b = pipe.model.generate(ids, past_key_values=recording(), **kw)
        for out in (a, b):
            out.past_key_values.crop(-3)
        seq_a, seq_b = a.sequences[:, :-2], b.sequences[:, :-2]  # the cache holds all but the last token
        more = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        want = ref.generate(seq_a, past_key_values=a.past_key_values, **more)
        got = pipe.model.generate(seq_b, past_key_values=b.past_key_values, **more)
        rewinds = pipe.stats()[1]["rewinds"]
    assert torch.equal(got.cpu(), want.cpu())
    assert rewinds == 1


def test_proposals_that_do_not_pay_are_paused(tiny_models):
    """A draft of other weights: hardly any proposal is accepted, so the call pauses its proposals
    once it has measured both kinds of step; the tokens stay transformers' own."""
    ref = _reference(tiny_models["llama"])
    draft = _reference(tiny_models["qwen3"])
    ids = _repeating().to(TEST_DEVICE)
    plain = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False)
    want = ref.generate(ids, **plain)
    with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False, dtype="float32") as pipe:
        got = pipe.model.generate(ids, assistant_model=draft, **plain)
        spec = pipe.stats()[0]["speculation"]
    assert torch.equal(got.cpu(), want.cpu())
    assert spec["switched_off"] == 1 and spec["accepted"] < spec["proposed"] < 200, spec


def test_the_cutoff_compares_tokens_per_second_and_pauses():
    class Inner:
        def __init__(self):
            self.updates = 0

        def get_candidates(self, ids):
            return torch.cat([ids, ids[:, -4:]], dim=1), None

        def update_candidate_strategy(self, ids, scores, n):
            self.updates += 1

    spec, inner = Speculation(), Inner()
    calls = Proposals(inner, spec, Cutoff(after=8, probes=2, pause=2, longest=3))
    ids = torch.zeros(1, 5, dtype=torch.long)

    def step(expect_len, proposed, accepted):
        assert calls.get_candidates(ids)[0].shape[1] == expect_len
        calls.update_candidate_strategy(ids, torch.zeros(1, proposed + 1, 8), accepted)

    step(9, 4, 1)
    step(9, 4, 1)  # two proposals, one of four accepted each
    calls._rates[True][0] += 10.0  # and they took far longer than what follows (measured time, made plain here)
    step(5, 0, 0)
    step(5, 0, 0)  # two plain probes: faster per token, so proposals pause for 2 steps
    assert calls.off and spec.switched_off == 1
    step(5, 0, 0)
    step(5, 0, 0)
    assert not calls.off  # then propose again, judged afresh
    step(9, 4, 1)
    calls._rates[True][0] += 10.0
    step(9, 4, 1)
    assert calls.paused == 3 and spec.switched_off == 1  # the next pause is longer (at most ``longest``)
    assert inner.updates == 4 and spec.figures()["speculation"]["acceptance"] == 0.25
    with pytest.raises(ValueError):
        Cutoff(after=-1)


def test_a_draft_model_is_placed_on_rank_0_and_assists_by_default(tiny_models, tmp_path):
    ref = _reference(tiny_models["llama"])
    draft_dir = write_tiny_model("llama", tmp_path / "draft", seed=1, layers=2)
    draft = _reference(draft_dir)
    ids = _repeating().to(TEST_DEVICE)
    plain = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False, dtype="float32",
                                 draft_model=str(draft_dir)) as pipe:
        assert pipe.draft is not None and pipe.draft.device == pipe.model.device
        got = pipe.model.generate(ids, **plain)  # the draft, by default
        off = pipe.model.generate(ids, assistant_model=None, **plain)
        batch = pipe.model.generate(ids.repeat(2, 1), **plain)  # two sequences: plain decoding
        spec = pipe.stats()[0]["speculation"]
    want = ref.generate(ids, **plain)
    assert torch.equal(got.cpu(), want.cpu()) and torch.equal(off.cpu(), want.cpu())
    assert torch.equal(batch.cpu(), ref.generate(ids.repeat(2, 1), **plain).cpu())
    assert spec["calls"] == 1 and spec["proposed"] > 0, spec
    assert torch.equal(got.cpu(), ref.generate(ids, assistant_model=draft, **plain).cpu())


def test_plan_counts_the_draft_on_rank_0(tiny_models, tmp_path):
    from torch_pp.placement.config import read_config
    from torch_pp.placement.balance import choose_plan
    from torch_pp.placement.sizing import draft_bytes, layer_bytes, model_sizes, stage_needs
    import dataclasses

    sizes = model_sizes(read_config(tiny_models["llama"]))
    with_draft = dataclasses.replace(sizes, draft=model_sizes(read_config(write_tiny_model("llama", tmp_path / "d", layers=2))))
    weights, kv = draft_bytes(with_draft, dtype="float32", context=64, batch=1)
    assert weights > 0 and kv == 2 * 2 * 64 * 2 * 16 * 4  # 2 layers x K,V x 64 positions x 2 heads x 16 dims x fp32
    plan = choose_plan(sizes, num_stages=2, balance="even", dtype="float32", context=64, batch=1)
    a = stage_needs(sizes, plan, dtype="float32", context=64, batch=1)
    b = stage_needs(with_draft, plan, dtype="float32", context=64, batch=1)
    assert b[0].total_bytes - a[0].total_bytes == weights + kv and b[1].total_bytes == a[1].total_bytes
    layers = sum(w + kv for w, kv in layer_bytes(sizes, dtype="float32", context=64, batch=1))
    memory = [layers + 4 * sizes.rank0_params] * 2  # the memory balance gives rank 0 fewer layers with a draft
    heavy = dataclasses.replace(sizes, draft=dataclasses.replace(with_draft.draft, rank0_params=layers // 8))
    even = choose_plan(sizes, num_stages=2, available=memory, dtype="float32", context=64, batch=1, reserve=0)
    moved = choose_plan(heavy, num_stages=2, available=memory, dtype="float32", context=64, batch=1, reserve=0)
    assert moved.ranges[0][1] < even.ranges[0][1], (even, moved)


@pytest.mark.parametrize("empty_crop", ["skipped", "fails"])
def test_the_draft_runs_over_slots_like_rank_0s_own_layers(tiny_models, tmp_path, monkeypatch, empty_crop):
    """graphs=True: the draft's steps run in slots (captured on a GPU, eager here), cropped after each
    verification as HF crops its cache, and the tokens stay transformers' own assisted ones; also where
    transformers' crop fails on a layer that never had an entry (5.17: the draft's keys and values live
    in slots and the stages', so most layers of either HF cache never get one)."""
    from transformers.cache_utils import DynamicLayer

    if empty_crop == "fails":
        crop = DynamicLayer.crop

        def strict_crop(self, tokens_to_remove):
            if tokens_to_remove and not self.is_initialized:
                raise TypeError("'NoneType' object is not subscriptable")
            return crop(self, tokens_to_remove)

        monkeypatch.setattr(DynamicLayer, "crop", strict_crop)
    ref = _reference(tiny_models["llama"])
    draft_dir = write_tiny_model("llama", tmp_path / "draft", seed=1, layers=2)
    ids = _repeating().to(TEST_DEVICE)
    plain = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    ref_draft = _reference(draft_dir)
    with torch_pp.local_pipeline(tiny_models["llama"], stages=2, progress=False, dtype="float32", graphs=True,
                                 draft_model=str(draft_dir)) as pipe:
        for draft in (pipe.draft, ref_draft):  # a random draft is never confident: make it draft 4 tokens anyway
            draft.generation_config.update(assistant_confidence_threshold=0.0, num_assistant_tokens=4)
        got = pipe.model.generate(ids, **plain)
        again = pipe.model.generate(ids, **plain)  # a second call reuses the draft's freed slot
        figures = pipe.stats()[0]
    assert torch.equal(got.cpu(), ref.generate(ids, assistant_model=ref_draft, **plain).cpu())
    assert torch.equal(again.cpu(), got.cpu())
    draft = figures["draft"]
    how = "graph" if TEST_DEVICE == "cuda" else "slot"  # replayed as CUDA graphs, or run as recorded
    assert draft["graphs"] == ("on" if TEST_DEVICE == "cuda" else "eager") and draft["slots"] >= 1, draft
    assert draft[f"{how}_steps"] + draft[f"{how}_verify_steps"] > 0 and draft["rewinds"] > 0, draft
    assert draft["captures"] >= 2, draft  # a one-token step and at least one verification shape
    assert figures["speculation"]["proposed"] > 0
