"""The server under load: throughput and time to first token with 1, 4 and 8 concurrent clients,
a pipelined server against the same server run as one process (1 stage), in one run.

    python bench/bench_serve.py [--model DIR] [--stages 2] [--device cpu] [--dtype float32]
                                [--quantize int4] [--clients 1,4,8] [--requests 2] [--new 32]
                                [--rounds 2] [--json out.json]

Both servers are started once under torchrun on 127.0.0.1 (the pipeline with ``--stages`` ranks
and ``--max-concurrent`` at least the largest client count). For each client count the two take
turns, round after round (the order flipped each round); each client sends ``--requests``
streaming chat requests one after another (greedy, ``--new`` tokens each, every client its own
prompt). Reported per server and client count: completion tokens per second over the whole
load (median over rounds), and time to first token p50/p95 over every request.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import dump, free_port, print_table  # noqa: E402

PROMPTS = ["Tell me about the history of computing.", "Explain how a bicycle works.", "Describe a day at the sea.",
           "What makes a good cup of tea?", "Write about the moon.", "Explain why the sky is blue.",
           "Describe a busy train station.", "Tell me about bees."]


def start_server(model: str, stages: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(stages),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "torch_pp", "serve", "--model", model,
           "--port", str(port), "--no-progress", "--device", args.device, "--dtype", args.dtype,
           "--max-concurrent", str(max(args.clients)), "--served-model-name", "bench"]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would fill up and stall the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log = log
    import httpx

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the {stages}-stage server ended:\n{log.read()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the {stages}-stage server did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's rank 0, which ends every rank cleanly; SIGKILL to all if it does not."""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:
        if w.environ().get("RANK") == "0":
            w.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for w in [psutil.Process(proc.pid), *workers]:
            try:
                w.kill()
            except psutil.Error:
                pass


def load(url: str, clients: int, requests: int, new: int) -> dict:
    """``clients`` concurrent clients, ``requests`` streaming requests each: tokens/s and every TTFT."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)

    def one_client(i: int) -> tuple[list[float], int]:
        ttfts, tokens = [], 0
        for _ in range(requests):
            start, first = time.perf_counter(), None
            stream = client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], temperature=0,
                max_tokens=new, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first if first is not None else time.perf_counter() - start)
        return ttfts, tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": sum(t for _, t in results) / wall, "ttfts": [x for ttfts, _ in results for x in ttfts]}


def note(line: str) -> None:
    """Progress on stderr, so that a run cut short still shows what it measured."""
    print(f"bench_serve: {line}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder with a tokenizer (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--new", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.model is None:
        from torch_pp.default_model import ensure_default_model

        args.model = str(ensure_default_model(progress=False))
    servers = {}
    try:
        for name, stages in (("pipeline", args.stages), ("one_process", 1)):  # one at a time: loading is heavy
            servers[name] = start_server(args.model, stages, args)
            note(f"{name} server up ({stages} stage{'s' if stages > 1 else ''})")
        for _, url in servers.values():  # warm-up: every server once at the largest load
            load(url, max(args.clients), 1, args.new)
        note("warmed")
        figures = {}
        for clients in args.clients:
            runs = {name: [] for name in servers}
            for r in range(args.rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    runs[name].append(load(servers[name][1], clients, args.requests, args.new))
            for name, rs in runs.items():
                ttfts = [x for r in rs for x in r["ttfts"]]
                figures[f"{name}/{clients}"] = {
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}
            note(f"{clients} clients: " + json.dumps({k: v for k, v in figures.items() if k.endswith(f"/{clients}")}))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    for clients in args.clients:
        figures[f"ratio/{clients}"] = figures[f"pipeline/{clients}"]["tokens_per_s"] / figures[f"one_process/{clients}"]["tokens_per_s"]
    dump({"model": args.model, "stages": args.stages, "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
          "requests_per_client": args.requests, "new_tokens": args.new, "rounds": args.rounds, "figures": figures}, args.json)
    rows = []
    for clients in args.clients:
        for name in ("pipeline", "one_process"):
            f = figures[f"{name}/{clients}"]
            rows.append([str(clients), f"{name} ({args.stages if name == 'pipeline' else 1} stage"
                         f"{'s' if name == 'pipeline' and args.stages > 1 else ''})", f"{f['tokens_per_s']:.1f}",
                         f"{1000 * f['ttft_p50_s']:.0f}", f"{1000 * f['ttft_p95_s']:.0f}"])
    print_table(rows, ["clients", "server", "tokens/s", "TTFT p50 ms", "TTFT p95 ms"])


if __name__ == "__main__":
    main()
