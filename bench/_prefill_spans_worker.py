"""Run under torchrun by prefill_spans.py: each prompt length's first token, timed, and every rank's
spans of the last repetition (``Pipeline.stats(spans_since=...)``).

    _prefill_spans_worker.py MODEL DEVICE DTYPE LENGTHS CHUNKS REPS OUT_JSON

CHUNKS: comma-separated ``prefill_chunk`` settings (0: whole; ``default``: the default rule; N tokens).
"""

import json
import statistics
import sys

import torch

import torch_pp
from torch_pp.devices import synchronize
from torch_pp.trace import now

model_dir, device, dtype, lengths, chunks, reps, out = sys.argv[1:8]
torch.set_num_threads(1)
pipe = torch_pp.start(model_dir, dtype=dtype, device=device, progress=False)
if pipe.is_driver:
    vocab = pipe.model.config.vocab_size
    figures = []
    for length in map(int, lengths.split(",")):
        ids = torch.randint(min(1000, vocab // 2), vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(pipe.device)
        for chunk in chunks.split(","):
            pipe.model.prefill_chunk = None if chunk == "default" else int(chunk)
            walls = []
            for rep in range(int(reps) + 1):  # the first warms every shape and buffer
                synchronize(pipe.device)
                start = now()
                with torch.inference_mode():
                    pipe.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                        pad_token_id=0)
                synchronize(pipe.device)
                end = now()
                walls.append(end - start)
            stages = pipe.stats(spans_since=start)
            spans = [[[name, a - start, b - start] for name, a, b in s["spans"] if a >= start and b <= end] for s in stages]
            figures.append({"length": length, "chunk": chunk, "ttft_s": statistics.median(walls[1:]), "walls_s": walls[1:],
                            "spans": spans})
    with open(out, "w") as f:
        json.dump({"stages": pipe.transport.world_size, "device": str(pipe.device), "figures": figures}, f)
pipe.close()
