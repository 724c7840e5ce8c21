"""Rank 0's model is a drop-in for its transformers class: the HF ecosystem's own callers give
transformers' results through a real 3-stage pipeline, or a clear refusal that names the option.

One pipeline (this process is rank 0, two local worker processes) serves the whole module, its LM
head split between rank 0 and the last stage; the reference is the same checkpoint in one process,
on the same device (``TORCH_PP_TEST_DEVICE``) in float32.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GenerationConfig, LogitsProcessorList, PreTrainedTokenizerFast,
                          SuppressTokensLogitsProcessor, TextIteratorStreamer, set_seed)

import torch_pp
from conftest import TEST_DEVICE
from tiny_models import VOCAB, write_tiny_model

GREEDY = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the tiny models: token i is the word ``w{i}``. Token 3, the unknown
    word, reads "abcdef": transformers' stop-string matching probes the vocabulary with that word."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    del vocab["w3"]
    vocab["abcdef"] = 3
    backend = Tokenizer(models.WordLevel(vocab, unk_token="abcdef"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2", pad_token="w0", unk_token="abcdef")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_tiny_model("llama", tmp_path_factory.mktemp("dropin") / "llama", layers=5)
    tok = word_tokenizer()
    tok.save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(TEST_DEVICE).eval()
    # The LM head split (rank 0 and stage 2 each multiply half its rows): every caller below takes that path.
    pipe = torch_pp.local_pipeline(path, stages=3, progress=False, layers="0:2,2:4,4:5", dtype="float32", split_head=True)
    yield pipe, ref, tok
    pipe.close()


def ids_of(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, device=TEST_DEVICE)


PROMPT = ids_of([1, 5, 9, 33, 70, 11])


# -- what held already: the ecosystem's callers ---------------------------------------------------

def test_text_generation_pipeline(setup):
    pipe, ref, tok = setup
    kw = dict(max_new_tokens=8, do_sample=False)
    ours = transformers.pipeline("text-generation", model=pipe.model, tokenizer=tok)("w1 w5 w9 w33", **kw)
    theirs = transformers.pipeline("text-generation", model=ref, tokenizer=tok)("w1 w5 w9 w33", **kw)
    assert ours == theirs and len(ours[0]["generated_text"].split()) > 4


def test_full_logits_and_labels_loss(setup):
    pipe, ref, _ = setup
    ids = ids_of([1, 5, 9, 33, 70, 11, 12, 13], [1, 7, 7, 40, 41, 42, 43, 44])
    ours, theirs = pipe.model(ids, labels=ids), ref(ids, labels=ids)
    assert ours.logits.shape == theirs.logits.shape == (2, 8, VOCAB)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)


def test_scores_and_logits(setup):
    pipe, ref, _ = setup
    kw = dict(GREEDY, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, theirs = pipe.model.generate(PROMPT, **kw), ref.generate(PROMPT, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name)) == 10
        for a, b in zip(getattr(ours, name), getattr(theirs, name)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sampling_with_several_return_sequences(setup):
    pipe, ref, _ = setup
    kw = dict(max_new_tokens=12, do_sample=True, num_return_sequences=3, top_k=20, temperature=0.8)
    set_seed(7)
    theirs = ref.generate(PROMPT, **kw)
    set_seed(7)
    ours = pipe.model.generate(PROMPT, **kw)
    assert ours.shape[0] == 3 and torch.equal(ours, theirs)


def test_without_cache(setup):
    pipe, ref, _ = setup
    assert torch.equal(pipe.model.generate(PROMPT, use_cache=False, **GREEDY), ref.generate(PROMPT, use_cache=False, **GREEDY))


def test_logits_processors_and_generation_config(setup):
    pipe, ref, _ = setup
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=False, no_repeat_ngram_size=2,
                              repetition_penalty=1.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(list(range(100, 160)))])
    ours = pipe.model.generate(PROMPT, generation_config=config, logits_processor=processors)
    theirs = ref.generate(PROMPT, generation_config=config, logits_processor=processors)
    assert torch.equal(ours, theirs)
    assert not ((ours[0, 6:] >= 100) & (ours[0, 6:] < 160)).any()


def test_text_iterator_streamer(setup):
    pipe, ref, tok = setup
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", pipe.model.generate(PROMPT, streamer=streamer, **GREEDY)))
    thread.start()
    words = "".join(streamer).split()
    thread.join(timeout=60)
    assert words == tok.convert_ids_to_tokens(ref.generate(PROMPT, **GREEDY)[0, 6:].tolist())


def test_continue_from_returned_cache_even_after_other_calls(setup):
    pipe, ref, _ = setup
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    first, ref_first = pipe.model.generate(PROMPT, **kw), ref.generate(PROMPT, **kw)
    assert torch.equal(first.sequences, ref_first.sequences)
    pipe.model.generate(ids_of([1, 99, 98, 97]), **GREEDY)  # another conversation in between
    ours = pipe.model.generate(first.sequences, past_key_values=first.past_key_values, **kw)
    theirs = ref.generate(ref_first.sequences, past_key_values=ref_first.past_key_values, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)


# -- defects that were silently wrong, hung or crashed ----------------------------------------------

def test_concurrent_generate_calls_from_threads(setup):
    """Without any lane API: each thread's call gets its own caches on the stages."""
    pipe, ref, _ = setup
    g = torch.Generator().manual_seed(11)
    jobs = [(torch.randint(3, VOCAB, (1, 4 + 3 * j), generator=g).to(TEST_DEVICE), 6 + 5 * j) for j in range(4)]
    wants = [ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False) for ids, n in jobs]
    for _ in range(3):
        got, errors = [None] * len(jobs), []

        def run(j):
            ids, n = jobs[j]
            try:
                got[j] = pipe.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        assert all(torch.equal(a, b) for a, b in zip(got, wants))
    # Every call's caches on the stages were dropped once its rank-0 cache was gone.
    assert [stage["kv_lanes"] for stage in pipe.stats()[1:]] == [0, 0]


def test_a_kept_cache_keeps_its_lane_until_it_is_gone(setup):
    pipe, _, _ = setup
    kept = pipe.model.generate(PROMPT, return_dict_in_generate=True, **GREEDY).past_key_values
    assert [stage["kv_lanes"] for stage in pipe.stats()[1:]] == [1, 1]
    del kept
    assert [stage["kv_lanes"] for stage in pipe.stats()[1:]] == [0, 0]


def test_hidden_states_of_every_layer(setup):
    pipe, ref, _ = setup
    ours, theirs = pipe.model(PROMPT, output_hidden_states=True), ref(PROMPT, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 6
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    as_tuple = pipe.model(PROMPT, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[-1]) == 6


def test_hidden_states_during_generate(setup):
    pipe, ref, _ = setup
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    ours, theirs = pipe.model.generate(PROMPT, **kw), ref.generate(PROMPT, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for step_a, step_b in zip(ours.hidden_states, theirs.hidden_states):
        assert len(step_a) == len(step_b) == 6
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_attentions_is_refused_by_name(setup):
    pipe, ref, _ = setup
    with pytest.raises(Exception, match="output_attentions"):
        pipe.model(PROMPT, output_attentions=True)
    with pytest.raises(Exception, match="output_attentions"):
        pipe.model.generate(PROMPT, output_attentions=True, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(pipe.model.generate(PROMPT, **GREEDY), ref.generate(PROMPT, **GREEDY))


def test_stop_strings_with_tokenizer(setup):
    pipe, ref, tok = setup
    full = ref.generate(PROMPT, max_new_tokens=12, do_sample=False)[0, 6:].tolist()
    stop = f"w{full[3]}"
    kw = dict(max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tok)
    theirs = ref.generate(PROMPT, **kw)
    assert theirs.shape[1] < 6 + 12, "the stop string must end the reference early"
    assert torch.equal(pipe.model.generate(PROMPT, **kw), theirs)


def test_failure_on_a_streamed_prefill_chunk_is_reported_not_hung(setup):
    """A copied cache has no caches on the stages: stage 1 fails on the first (streamed) chunk."""
    pipe, ref, _ = setup
    first = pipe.model.generate(PROMPT, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    copied = copy.deepcopy(first.past_key_values)
    more = torch.cat([first.sequences, torch.randint(3, VOCAB, (1, 40)).to(TEST_DEVICE)], dim=1)
    pipe.model.prefill_chunk = 8
    outcome = {}

    def call():
        try:
            pipe.model(more[:, first.sequences.shape[1]:], past_key_values=copied, use_cache=True, logits_to_keep=1)
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc

    try:
        started = time.monotonic()
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the pipeline hung"
        assert time.monotonic() - started < 30
        error = outcome["error"]
        if pipe.stats()[0]["graphs"] == "off":
            assert isinstance(error, torch_pp.PipelineError) and "stage 1" in str(error) and "out of step" in str(error), error
        else:  # rank 0's own layers keep their keys and values in slots too: they refuse it first
            assert isinstance(error, torch_pp.StageError) and "rank 0's own layers 0:2" in str(error), error
            assert "out of step" in str(error)
        # Still usable, chunked or not.
        long_prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5)).to(TEST_DEVICE)
        assert torch.equal(pipe.model.generate(long_prompt, **GREEDY), ref.generate(long_prompt, **GREEDY))
    finally:
        pipe.model.prefill_chunk = None


def test_out_of_range_sampling_is_refused_before_sending(setup):
    pipe, ref, _ = setup
    before = pipe.rank0.timer.calls
    for bad in (dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1), dict(repetition_penalty=0.0)):
        name = next(iter(bad))
        with pytest.raises(torch_pp.OptionsError, match=name):
            pipe.model.generate(PROMPT, do_sample=True, max_new_tokens=4, **bad)
    assert pipe.rank0.timer.calls == before
    assert torch.equal(pipe.model.generate(PROMPT, **GREEDY), ref.generate(PROMPT, **GREEDY))


def test_unsent_keyword_arguments_do_not_reach_the_wire(setup):
    """Keywords the decoder layers cannot consume stay on rank 0 (here: a tokenizer and a callable)."""
    pipe, ref, tok = setup
    span = pipe.rank0.span
    assert span.accepts is not None and "attention_mask" in span.accepts and "tokenizer" not in span.accepts
    ours = pipe.model(PROMPT, tokenizer=tok, some_callback=lambda: None)
    torch.testing.assert_close(ours.logits, ref(PROMPT).logits, atol=1e-5, rtol=1e-5)


def test_one_thread_at_a_time_computes_on_rank_0(setup):
    """Lanes run in threads; their device work on rank 0 takes turns (MPS aborts on concurrent use)."""
    from torch_pp.trace import now

    pipe, ref, _ = setup
    batch = torch.randint(3, VOCAB, (6, 8), generator=torch.Generator().manual_seed(2)).to(TEST_DEVICE)
    t0 = now()
    out = pipe.model.generate(batch, lanes=3, pad_token_id=0, **GREEDY)
    parts = torch.tensor_split(torch.arange(6), 3)
    assert torch.equal(out, torch.cat([ref.generate(batch[p], pad_token_id=0, **GREEDY) for p in parts]))
    spans = sorted((a, b) for name, a, b in pipe.rank0.timer.tracer.since(t0) if name == "compute")
    assert len(spans) >= 3 * 10
    overlaps = [(x, y) for x, y in zip(spans, spans[1:]) if y[0] < x[1] - 1e-6]
    assert overlaps == [], f"{len(overlaps)} of {len(spans)} compute spans overlap"


def test_the_split_head_joined_every_step_it_split(setup):
    """Rank 0 and the last stage each multiplied their rows of the head for every token of a call, and
    HF's lm_head returned the joined logits every time (no fallback to multiplying it whole)."""
    pipe, ref, _ = setup
    kw = dict(GREEDY, return_dict_in_generate=True, output_logits=True)
    span = pipe.rank0.span
    head, span.head = span.head, None  # rank 0 multiplies the whole head, as without the split
    try:
        whole = pipe.model.generate(PROMPT, **kw)
    finally:
        span.head = head
    before = pipe.stats()
    ours, theirs = pipe.model.generate(PROMPT, **kw), ref.generate(PROMPT, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.logits) == 10 and all(torch.equal(a, b) for a, b in zip(ours.logits, whole.logits))  # bit for bit
    after = pipe.stats()
    assert (after[0]["head_rows"], after[2]["head_rows"]) == (VOCAB // 2, VOCAB - VOCAB // 2)
    assert "head_rows" not in after[1]
    assert after[0]["head_steps"] - before[0]["head_steps"] == 10  # the prompt's last position, then 9 tokens
    assert after[2]["head_steps"] - before[2]["head_steps"] == 10
    assert after[0]["head_fallbacks"] == 0
    # The last stage read only its rows of the head (and the final norm) besides its layer.
    layer = sum(p.numel() for p in ref.model.layers[4].parameters())
    assert after[2]["weight_bytes"] == 4 * (layer + (VOCAB - VOCAB // 2) * 64 + 64)


def test_a_stage_that_cannot_multiply_its_head_rows_answers_with_an_error_naming_it(setup):
    from torch_pp.model.head import TailHead
    from torch_pp.model.stage import StageRunner
    from torch_pp.net.wire import Op
    from torch_pp.runtime.serve import tail_logits

    _, ref, _ = setup
    runner = StageRunner({4: ref.model.layers[4]}, ref.config)
    hidden = torch.randn(1, 1, 64, device=TEST_DEVICE)
    reply = tail_logits(runner, hidden, 7, where="stage 2 on vm")
    assert reply.op == Op.ERROR and reply.meta["req"] == 7 and "stage 2 on vm" in reply.meta["error"]
    assert "split_head" in reply.meta["error"]
    runner.tail = TailHead(ref.model.norm, torch.nn.Linear(32, 128, bias=False).to(TEST_DEVICE))  # rows of the wrong width
    reply = tail_logits(runner, hidden, 8, where="stage 2 on vm")
    assert reply.op == Op.ERROR and reply.meta["req"] == 8 and "rows of the LM head" in reply.meta["error"]
    runner.tail = TailHead(ref.model.norm, ref.lm_head)
    reply = tail_logits(runner, hidden, 9, where="stage 2 on vm")
    assert reply.op == Op.RESULT and reply.meta["req"] == 9 and reply.meta["compute_s"] > 0
    with torch.no_grad():
        assert torch.equal(reply.tensors[0], ref.lm_head(ref.model.norm(hidden)))
