"""Shared helpers for the benchmarks: timing one generate() call and printing results."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from torch_pp.streamers import TokenTimer
from torch_pp.net.rendezvous import free_port  # noqa: F401 - the benchmarks' one free_port
from torch_pp.tables import table


def timed_generate(model, inputs: dict, *, new_tokens: int) -> dict:
    """One greedy generate() of exactly ``new_tokens`` tokens: TTFT, decode tokens/s, wall time."""
    timer = TokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer)
    wall = time.perf_counter() - start
    return {"ttft_s": timer.ttft_s, "decode_tokens_per_s": timer.decode_tokens_per_s, "wall_s": wall, "tokens": out[0].tolist()}


def outside_turn(short: int, long: int):
    """A repetition measured from outside: a ``short`` and a ``long`` greedy run, back to back; the
    long run's figures plus ``outside_tokens_per_s``, the extra tokens over the extra wall time
    (whatever a call costs besides its decode steps cancels out)."""
    def turn(worker: "TurnWorker") -> dict:
        a = worker.ask("run " + json.dumps({"new_tokens": short}))
        b = worker.ask("run " + json.dumps({"new_tokens": long}))
        return {**b, "outside_tokens_per_s": (long - short) / (b["wall_s"] - a["wall_s"])}
    return turn


def torchrun_cmd(nproc: int, script: Path, *args: str) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` with ``nproc`` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *map(str, args)]


def gloo_floor(stages: int, work_ms: float, *, rounds: int = 60) -> float:
    """Milliseconds per ring hop over bare Gloo (nothing of torch_pp's) when each rank works
    ``work_ms`` between hops, as a decoding pipeline's stages do (a process that slept longer
    wakes slower): the machine's floor under torch_pp's own cost per boundary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "floor.json")
        subprocess.run(torchrun_cmd(stages, Path(__file__).parent / "_gloo_floor.py", work_ms, rounds, out),
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())["per_hop_ms"]


def load_tokenizer(model_dir):
    """The folder's tokenizer, or None for a folder without one (a random-weight test model)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        return None
    tok.padding_side = "left"  # decoder-only batches: generation continues at the right edge
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_inputs(tok, prompts: str | list[str]) -> dict:
    """Input ids for one prompt or a left-padded batch: through the chat template where the
    tokenizer has one, plain text where it has none, and a fixed 32-token prompt per row for a
    folder without a tokenizer."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if tok is None:
        ids = torch.stack([torch.arange(100, 132) + 7 * i for i in range(len(batch))])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([[{"role": "user", "content": p}] for p in batch], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True, padding=True)
    return dict(tok(batch, return_tensors="pt", padding=True))


def long_inputs(tok, length: int) -> dict:
    """A prompt of exactly ``length`` tokens (plain text, or fixed ids without a tokenizer)."""
    if tok is None:
        ids = (torch.arange(length) % 97 + 3).unsqueeze(0)  # within any vocabulary
    else:
        text = "The history of computing is a long story of machines, people and ideas. "
        ids = tok(text * (length // 8 + 1), return_tensors="pt")["input_ids"][:, :length]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_table(rows: list[list], headers: list[str]) -> None:
    print("\n".join(table(headers, rows)))


def dump(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


# -- taking turns ----------------------------------------------------------------
# The baseline and the pipeline run in their own processes, but their repetitions
# alternate (HF, pipeline, pipeline, HF, ...), so that the drift of a shared, noisy
# machine hits both sides alike. A worker blocks on its stdin between turns (no CPU).

MARK = "BENCH "


def serve_turns(run_once, finish, ready: dict | None = None) -> None:
    """Worker side: answer each ``run`` line on stdin with ``run_once()`` (``run {json}``: with that
    spec as its argument), ``quit`` with ``finish()``; ``ready`` goes with the first answer."""
    print(MARK + json.dumps({"ready": True, **(ready or {})}), flush=True)
    for line in sys.stdin:
        word, _, spec = line.strip().partition(" ")
        if word == "run":
            print(MARK + json.dumps(run_once(json.loads(spec)) if spec else run_once()), flush=True)
        elif word == "quit":
            print(MARK + json.dumps(finish()), flush=True)
            return


class TurnWorker:
    """Orchestrator side of ``serve_turns``: a worker process asked for one repetition at a time."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._answer()  # what the worker said once loaded (see ``serve_turns``)

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"benchmark worker {self.proc.args[:4]} ended early (exit {self.proc.wait()})")

    def ask(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> dict:
        final = self.ask("quit")
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise RuntimeError(f"benchmark worker {self.proc.args[:4]} exited {self.proc.returncode}")
        return final


def alternate(workers: dict[str, TurnWorker], reps: int, turn=None) -> dict[str, list[dict]]:
    """``reps`` repetitions of each worker, each round in the next of all orders (two workers:
    A B, B A, A B, ...; three: each of the six orders in turn), so that no worker always follows
    the same other one or keeps one place: on a VM a run can depend on the one before it.
    ``turn(worker)`` is one repetition (default: one ``run``)."""
    names = list(workers)
    orders = list(itertools.permutations(names))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(reps):
        for n in orders[i % len(orders)]:
            runs[n].append(turn(workers[n]) if turn else workers[n].ask("run"))
    return runs
