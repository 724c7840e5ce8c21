"""Shared helpers for the benchmarks: timing one generate() call and printing results."""

from __future__ import annotations

import json
import statistics
import time

import torch

from torch_pp.generate import TokenTimer


def timed_generate(model, inputs: dict, *, new_tokens: int) -> dict:
    """One greedy generate() of exactly ``new_tokens`` tokens: TTFT, decode tokens/s, wall time."""
    timer = TokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer)
    wall = time.perf_counter() - start
    return {"ttft_s": timer.ttft_s, "decode_tokens_per_s": timer.decode_tokens_per_s, "wall_s": wall, "tokens": out[0].tolist()}


def make_inputs(tok, prompt: str) -> dict:
    """A chat prompt's input ids, or a fixed 32-token prompt for a model folder without a tokenizer."""
    if tok is None:
        ids = torch.arange(100, 132).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_table(rows: list[list], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))


def dump(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
