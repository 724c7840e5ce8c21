"""Run under torchrun by test_split_equals_whole: every model, one pipeline each, compared with HF.

Rank 0 writes a JSON report to ``$OUT/report.json``; every rank writes ``$OUT/rank{r}.json``
with the parameter names it holds for each model.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

import torch_pp
from torch_pp.errors import UnsupportedGenerationError
from torch_pp.net.transport import Transport

OUT = os.environ["OUT"]
models = sys.argv[1:]
transport = Transport.from_env()
rank = transport.rank
report, params = {}, {}


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


class StopAfter(StoppingCriteria):
    def __init__(self, n, prompt_len):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.prompt_len + self.n, dtype=torch.bool, device=input_ids.device)


DEVICE = os.environ.get("TEST_DEVICE")  # e.g. cuda on a GPU machine; default: the pipeline's choice (cpu here)


def check(name, path, pipe):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(pipe.device).eval()
    model = pipe.model
    r = {}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (1, 12), generator=g).to(pipe.device)
    with torch.no_grad():
        a, b = ref(ids).logits[:, -1], model(ids).logits[:, -1]
    r["logits_max_diff"] = (a - b).abs().max().item()
    r["logits_equal"] = torch.equal(a, b)

    want = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    r["greedy_equal"] = torch.equal(want, got)
    r["greedy_new_tokens"] = got.shape[1] - ids.shape[1]
    if name.endswith("-sharded"):  # the same weights in other files: what depends on loading is above
        r["stats"] = pipe.stats()
        return r

    lens = [5, 9, 3]
    batch = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lens):  # left padding, pad id 0
        batch[i, 9 - n:] = torch.randint(3, 250, (n,), generator=g)
        mask[i, 9 - n:] = 1
    batch, mask = batch.to(pipe.device), mask.to(pipe.device)
    kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    want, got = ref.generate(batch, **kw), model.generate(batch, **kw)
    r["batch_equal"] = torch.equal(want, got)
    with torch.no_grad():
        la = ref(batch, attention_mask=mask).logits[:, -1]
        lb = model(batch, attention_mask=mask).logits[:, -1]
    r["batch_logits_max_diff"] = (la - lb).abs().max().item()

    samp = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=24, min_new_tokens=24)
    set_seed(7)
    want = ref.generate(ids, **samp)
    set_seed(7)
    got = model.generate(ids, **samp)
    r["sample_equal"] = torch.equal(want, got)
    set_seed(8)
    other = model.generate(ids, **samp)
    r["sample_seed_matters"] = not torch.equal(got, other)

    streamer = Collect()
    got = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    streamed = [t for c in streamer.chunks[1:-1] for t in c]
    r["stream_in_order"] = streamed == got[0, ids.shape[1]:].tolist() and streamer.chunks[-1] == "end"

    stopped = model.generate(ids, max_new_tokens=30, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter(5, ids.shape[1])]))
    r["stopped_new_tokens"] = stopped.shape[1] - ids.shape[1]
    again = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    r["after_stop_ok"] = torch.equal(again, ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False))

    try:
        model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
        r["beam_error"] = None
    except UnsupportedGenerationError as exc:
        r["beam_error"] = str(exc)
    r["after_beam_ok"] = torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), ref.generate(ids, max_new_tokens=4, do_sample=False))
    r.update(speculative(ref, model, g))
    r["stats"] = pipe.stats()
    return r


def speculative(ref, model, g):
    """Assisted generation through the pipeline: prompt lookup and a draft model, greedy and sampled,
    on a prompt longer than the tiny models' sliding window, chunked, and continued from a cache."""
    r = {}
    draft = AutoModelForCausalLM.from_pretrained(os.environ["DRAFT"], dtype=torch.float32).to(model.device).eval()
    pattern = torch.randint(3, 250, (1, 7), generator=g)
    long_ids = torch.cat([pattern] * 6, dim=1).to(model.device)  # 42 tokens: n-grams to find, past the window of 16
    plain = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    lookup = dict(plain, prompt_lookup_num_tokens=5)
    want_plain = ref.generate(long_ids, **plain)
    got = model.generate(long_ids, **lookup)
    r["lookup_equal_plain"] = torch.equal(got, want_plain)
    r["lookup_equal_hf"] = torch.equal(got, ref.generate(long_ids, **lookup))
    chunk, model.prefill_chunk = model.prefill_chunk, 4  # the first verification keeps more than a chunk
    try:
        r["chunked_lookup_equal"] = torch.equal(model.generate(long_ids, **lookup), want_plain)
    finally:
        model.prefill_chunk = chunk
    drafted = dict(plain, assistant_model=draft)
    got = model.generate(long_ids, **drafted)
    r["draft_equal_plain"] = torch.equal(got, want_plain)
    r["draft_equal_hf"] = torch.equal(got, ref.generate(long_ids, **drafted))
    # The target's own weights as the draft: every proposal accepted, the verification's last positions kept.
    got = model.generate(long_ids, **dict(plain, assistant_model=ref))
    r["self_draft_equal_plain"] = torch.equal(got, want_plain)
    sampled = dict(max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=0.7, top_k=20)
    for name, extra in (("lookup", {"prompt_lookup_num_tokens": 5}), ("draft", {"assistant_model": draft})):
        set_seed(11)
        want = ref.generate(long_ids, **sampled, **extra)
        set_seed(11)
        r[f"{name}_sample_equal"] = torch.equal(model.generate(long_ids, **sampled, **extra), want)
    # Continue from a returned cache (HF cropped it after its last verification).
    first = dict(lookup, max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True)
    a, b = ref.generate(long_ids, **first), model.generate(long_ids, **first)
    more = dict(lookup, max_new_tokens=12, min_new_tokens=12)
    want = ref.generate(a.sequences, past_key_values=a.past_key_values, **more)
    got = model.generate(b.sequences, past_key_values=b.past_key_values, **more)
    r["continued_equal"] = torch.equal(got, want) and torch.equal(a.sequences, b.sequences)
    return r


for path in models:
    name = os.path.basename(path)
    pipe = torch_pp.start(path, transport=transport, progress=False, device=DEVICE, dtype="float32",
                          split_head=True if os.environ.get("SPLIT_HEAD") else None)
    params[name] = {
        "layers": list(pipe.plan.ranges[rank]),
        "params": sorted(n for n, _ in pipe.stage.model.named_parameters()),
        "weight_bytes": pipe.stage.weight_bytes,
    }
    if pipe.is_driver:
        report[name] = check(name, path, pipe)
        pipe.close()

with open(os.path.join(OUT, f"rank{rank}.json"), "w") as f:
    json.dump(params, f)
if rank == 0:
    with open(os.path.join(OUT, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
transport.close()
