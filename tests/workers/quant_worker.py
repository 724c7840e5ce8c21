"""Run under torchrun (2 ranks) by test_quant: int8 and int4 pipelines against the same quantized
model in one process, the plan's quantized bytes against what each stage holds, and SmolLM2's
perplexity and answers in each mode.

    quant_worker.py SMOLLM2_DIR TINY_DIR...     rank 0 writes $OUT/quant.json
"""

import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import torch_pp
from torch_pp import archs
from torch_pp.model import quant
from torch_pp.net.transport import Transport
from torch_pp.placement.config import read_config
from torch_pp.placement.sizing import model_sizes, stage_needs

smol, tiny = sys.argv[1], sys.argv[2:]
transport = Transport.from_env()
report = {}


def quantized_reference(path, mode):
    """The whole model in this process, every decoder linear quantized by the same code."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = f"{archs.LAYOUT.base}.{archs.LAYOUT.layers}."
    for name, module in list(ref.named_modules()):
        if quant.quantizable(ref, f"{name}.weight", layers_prefix=prefix, mode=mode) is not None:
            quant.quantize_module(ref, name, module.weight.detach(), device=torch.device("cpu"), dtype=torch.float32,
                                  mode=mode)
    return ref


for path, mode in [(p, m) for p in tiny for m in quant.MODES]:
    pipe = torch_pp.start(path, transport=transport, progress=False, dtype="float32", quantize=mode, balance="even")
    stats = pipe.stats() if pipe.is_driver else None
    if pipe.is_driver:
        ref = quantized_reference(path, mode)
        ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ref(ids).logits - pipe.model(ids).logits).abs().max().item()
        kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
        planned = stage_needs(model_sizes(read_config(path)), pipe.plan, dtype="float32", context=16, batch=1, quantize=mode)
        report[f"{os.path.basename(path)}/{mode}"] = {
            "logits_max_diff": diff, "same_tokens": torch.equal(ref.generate(ids, **kw), pipe.model.generate(ids, **kw)),
            "held": [s["weight_bytes"] for s in stats], "planned": [n.weight_bytes for n in planned],
            "quantized_modules": sum(isinstance(m, quant.LAYERS[mode]) for m in pipe.model.modules()),
        }
        pipe.close()

# SmolLM2: the pipeline's labels= loss over 2048 tokens of fixed text, unquantized and quantized.
losses = {}
report["answers"] = {}
for mode in (None, *quant.MODES):
    pipe = torch_pp.start(smol, transport=transport, progress=False, dtype="float32", quantize=mode)
    if pipe.is_driver:
        tok = AutoTokenizer.from_pretrained(smol)
        text = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
        ids = tok(text, return_tensors="pt")["input_ids"][:, :2048]
        assert ids.shape[1] == 2048, ids.shape
        with torch.no_grad():
            losses[mode or "float32"] = pipe.model(ids, labels=ids).loss.item()
        if mode:
            chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Write a haiku about cables.",
                                                                "Explain gravity in one sentence.")]
            report["answers"][mode] = []
            for messages in chat:
                inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                out = pipe.model.generate(**inputs, max_new_tokens=40, do_sample=False)
                report["answers"][mode].append(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        pipe.close()
if transport.rank == 0:
    report["perplexity"] = {k: math.exp(v) for k, v in losses.items()}
    with open(os.path.join(os.environ["OUT"], "quant.json"), "w") as f:
        json.dump(report, f, indent=1)
transport.close()
