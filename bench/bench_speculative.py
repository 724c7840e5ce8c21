"""Speculative decoding through the pipeline: one stream, plain vs prompt lookup vs a draft model.

    python bench/bench_speculative.py                       # the embedded SmolLM2, 2 stages on this machine
    python bench/bench_speculative.py --draft DIR           # also a draft model (same tokenizer)
    python bench/bench_speculative.py --model DIR --device cuda --dtype bfloat16 --tokenizer TOK --json out.json

Two kinds of prompt: input-grounded ones (edit, summarise or rename in a given text: the texts in
``bench/texts/``), whose answers copy long spans of the prompt, and open chat prompts, whose
answers do not. Every mode runs every prompt in every round, the modes' order rotating from
round to round, after one untimed warm-up round; greedy, so every mode must give the very same
tokens (checked: in float32 a mode that differs fails the run; in 16 bits, where a verification
step's kernels round differently from a one-token step's, as in transformers alone, it is listed). Reported per kind of prompt: decode tokens
per second (the generated tokens after the first over the time after the first), the ratio to
plain decoding of the same pipeline in the same run (medians over rounds of the kind's total
tokens over total time), and the proposals accepted.

``--step-costs`` also times one forward of q = 1, 2, 4, ... tokens after a cached prefix (then
cropped back, as a rejected proposal is): what a verification step costs against a plain one on
this device, whatever a model's weights would accept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_tokenizer  # noqa: E402

from torch_pp.streamers import TokenTimer  # noqa: E402
from torch_pp.tables import table  # noqa: E402

TEXTS = Path(__file__).parent / "texts"
OPEN = (
    "Write a short story about a dragon who learns to cook.",
    "What are three good reasons to learn a second language? Answer in a few sentences.",
    "Invent a new board game and explain its rules.",
)


def prompts(tokenizer) -> dict[str, list[torch.Tensor]]:
    """Token ids of each kind's prompts, through the chat template where the tokenizer has one."""
    def ids(text: str) -> torch.Tensor:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        return tokenizer(text, return_tensors="pt")["input_ids"]

    grounded = [ids(p.read_text()) for p in sorted(TEXTS.glob("*.txt"))]
    return {"grounded": grounded, "open": [ids(t) for t in OPEN]}


def run_once(model, ids: torch.Tensor, *, new: int, mode: dict) -> dict:
    timer = TokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=new, do_sample=False, streamer=timer, **mode)
    wall = time.perf_counter() - start
    decode_tokens = sum(timer.tokens[1:])
    decode_s = timer.stamps[-1] - timer.stamps[0] if len(timer.stamps) > 1 else 0.0
    return {"tokens": out[0, ids.shape[1]:].tolist(), "wall_s": wall, "decode_tokens": decode_tokens, "decode_s": decode_s}


def step_costs(model, *, prefix: int = 256, sizes=(1, 2, 4, 8, 16), reps: int = 20) -> dict[int, float]:
    """Milliseconds of one forward of q tokens after ``prefix`` cached ones, each cropped back after."""
    from transformers import DynamicCache

    from torch_pp.rank0.placeholders import mark_cropped

    device = model.device
    ids = torch.randint(1000, 20000, (1, prefix + max(sizes)), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        mark_cropped(cache)  # as an assisted call marks it: its crops pass over layers held elsewhere
        model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        for q in sizes:
            times = []
            for i in range(reps + 3):  # the first few warm this shape (cuDNN plans, captures)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(ids[:, prefix:prefix + q], past_key_values=cache, use_cache=True, logits_to_keep=q)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
                cache.crop(-q)  # a rejected proposal: the stages move back too
            out[q] = 1000 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tokenizer", help="tokenizer folder, for a model folder without one")
    ap.add_argument("--ids", help="the prompts' token ids as JSON (written by --save-ids), for a machine without the tokenizer")
    ap.add_argument("--save-ids", help="write the prompts' token ids (by --tokenizer) to this file and stop")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--device")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--draft", help="a draft model folder (same tokenizer): adds the draft mode")
    ap.add_argument("--lookup", type=int, default=8, help="prompt lookup's tokens per proposal")
    ap.add_argument("--new", type=int, default=128, help="at most this many new tokens per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-costs", action="store_true", help="also time verification steps of q tokens")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.save_ids:
        kinds = prompts(load_tokenizer(args.tokenizer))
        Path(args.save_ids).write_text(json.dumps({k: [t[0].tolist() for t in v] for k, v in kinds.items()}))
        return

    import torch_pp

    options = dict(progress=False, dtype=args.dtype, **({"device": args.device} if args.device else {}))
    if args.draft:
        options["draft_model"] = args.draft
    with torch_pp.local_pipeline(args.model, stages=args.stages, **options) as pipe:
        if args.ids:
            kinds = {k: [torch.tensor([t]) for t in v] for k, v in json.loads(Path(args.ids).read_text()).items()}
        else:
            kinds = prompts(load_tokenizer(args.tokenizer or pipe.model_dir))
        modes = {"plain": {"assistant_model": None}, "lookup": {"prompt_lookup_num_tokens": args.lookup}}
        if pipe.draft is not None:
            modes["draft"] = {}  # the pipeline's draft assists one-sequence calls by default
        names = list(modes)
        totals = {(kind, name): [] for kind in kinds for name in names}  # per round: (tokens, seconds)
        accepted = {name: [0, 0] for name in names}
        reference: dict[tuple[str, int], list[int]] = {}
        differed: list[str] = []
        for rnd in range(args.rounds + 1):  # round 0 warms every prompt and mode, untimed
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            sums = {key: [0, 0.0] for key in totals}
            for kind, items in kinds.items():
                for i, ids in enumerate(items):
                    for name in order:
                        before = pipe.stats()[0]["speculation"]
                        r = run_once(pipe.model, ids, new=args.new, mode=modes[name])
                        after = pipe.stats()[0]["speculation"]
                        want = reference.setdefault((kind, i), r["tokens"])
                        if r["tokens"] != want:  # fp32: never; bf16 verifies k+1 tokens with other kernels
                            differed.append(f"{name} {kind} {i}")
                            if args.dtype == "float32":
                                raise SystemExit(f"{name} gave other tokens than plain decoding on {kind} prompt {i}")
                        sums[(kind, name)][0] += r["decode_tokens"]
                        sums[(kind, name)][1] += r["decode_s"]
                        if rnd:
                            accepted[name][0] += after["accepted"] - before["accepted"]
                            accepted[name][1] += after["proposed"] - before["proposed"]
            if rnd:
                for key, (n, s) in sums.items():
                    totals[key].append((n, s))
        stages = pipe.stats()
        costs = step_costs(pipe.model) if args.step_costs else None
    rows, result = [], {"model": str(args.model or "SmolLM2-135M-Instruct (embedded)"), "stages": args.stages,
                        "device": str(stages[0]["device"]), "dtype": args.dtype, "lookup": args.lookup,
                        "draft": args.draft, "new_tokens": args.new, "rounds": args.rounds, "kinds": {}}
    for kind in kinds:
        plain = [n / s for n, s in totals[(kind, "plain")]]
        entry = {}
        for name in names:
            rates = [n / s for n, s in totals[(kind, name)]]
            ratios = [r / p for r, p in zip(rates, plain)]
            entry[name] = {"decode_tokens_per_s": statistics.median(rates), "ratio_to_plain": statistics.median(ratios),
                           "tokens_per_round": totals[(kind, name)][0][0]}
            rows.append([kind, name, f"{entry[name]['decode_tokens_per_s']:.1f}", f"{entry[name]['ratio_to_plain']:.2f}x"])
        result["kinds"][kind] = entry
    result["differed_from_plain"] = differed
    result["acceptance"] = {name: (a / p if p else None) for name, (a, p) in accepted.items()}
    result["accepted_proposed"] = accepted
    if costs is not None:
        result["step_ms"] = costs
    print(json.dumps(result))
    print("\n".join(table(["prompts", "mode", "decode tok/s", "vs plain"], rows)))
    print("acceptance: " + ", ".join(f"{n} {a:.2f}" for n, a in result["acceptance"].items() if a is not None))
    if costs is not None:
        print("step ms by tokens verified: " + ", ".join(f"{q}: {ms:.2f}" for q, ms in costs.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
