"""The server under load: throughput and time to first token with 1, 4, 8 and 16 concurrent
clients, continuous batching against today's one-lane-per-request server and against one
``generate()`` of the same batch, on the pipeline and in one process, in one run.

    python bench/bench_serve.py [--model DIR] [--stages 2] [--device cpu] [--dtype float32]
                                [--quantize int4] [--clients 1,4,8,16] [--requests 2] [--new 32]
                                [--rounds 2] [--servers batched,lanes,one_process] [--json out.json]

The servers are started once each under torchrun on 127.0.0.1, ``--max-concurrent`` the largest
client count: ``batched`` (the pipeline with ``--stages`` ranks, continuous batching as by
default; ``batched_1`` and ``batched_2`` with one or two batches in flight, on request), ``lanes`` (the same pipeline with ``--batches 0``: one ``generate()`` per request in its
own lane, the server before continuous batching) and ``one_process`` (one stage, batching). For
each client count they take turns, round after round (the order flipped each round); each client
sends ``--requests`` streaming chat requests one after another (greedy, ``--new`` tokens each,
every client its own prompt). Reported per server and client count: completion tokens per
second over the whole load (median over rounds), time to first token p50/p95 over every
request; ``generate/N``: one greedy ``generate()`` of the N clients' prompts as one batch on the
same pipeline (``_batch_worker.py``), the bound batching aims at; ``late``: at the largest client
count, the time to first token of a request that arrives while the others decode, against the
same request alone plus one decode step of the loaded batch. Before the timed rounds every server
runs every client count's load once, untimed.
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


def start_server(model: str, stages: int, args, batches: str = "auto") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(stages),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "torch_pp", "serve", "--model", model,
           "--port", str(port), "--no-progress", "--device", args.device, "--dtype", args.dtype,
           "--max-concurrent", str(max(args.clients)), "--max-queue", str(max(args.clients)),
           "--batches", batches, "--served-model-name", "bench"]
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


def late_arrival(url: str, clients: int, new: int) -> dict:
    """TTFT of one request sent while ``clients - 1`` others are decoding long completions."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    started = []

    def long_client(i: int) -> None:
        stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                temperature=0, max_tokens=4 * new, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and len(started) <= i:
                started.append(i)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        busy = [pool.submit(long_client, i) for i in range(clients - 1)]
        while len(started) < clients - 1 and not any(b.done() for b in busy):
            time.sleep(0.01)
        time.sleep(0.2)  # mid-decode
        late = pool.submit(lambda: load(url, 1, 1, 1)["ttfts"][0]).result()
        for b in busy:
            b.result()
    return {"late_ttft_s": late}


def batch_generate(model: str, stages: int, sizes: list[int], args) -> dict[str, float]:
    """Tokens/s of one greedy generate() of each batch size on the pipeline (``_batch_worker.py``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "batch.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(stages),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(HERE / "_batch_worker.py"), model,
               str(args.new), ",".join(map(str, sizes)), str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "BENCH_DEVICE": args.device, "BENCH_DTYPE": args.dtype})
        return json.loads(out.read_text())


SERVERS = {"batched": ("pipeline", "auto"), "batched_1": ("pipeline", "1"), "batched_2": ("pipeline", "2"),
           "lanes": ("pipeline", "0"), "one_process": (1, "auto")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder with a tokenizer (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--new", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="batched,lanes,one_process", help="which servers, comma-separated")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    names = args.servers.split(",")
    if args.model is None:
        from torch_pp.default_model import ensure_default_model

        args.model = str(ensure_default_model(progress=False))
    figures = {f"generate/{n}": {"tokens_per_s": v} for n, v in batch_generate(args.model, args.stages, args.clients, args).items()}
    note("batch generate(): " + json.dumps(figures))
    servers = {}
    try:
        for name in names:  # one at a time: loading is heavy
            stages, batches = SERVERS[name]
            stages = args.stages if stages == "pipeline" else stages
            servers[name] = start_server(args.model, stages, args, batches)
            note(f"{name} server up ({stages} stage{'s' if stages > 1 else ''}, --batches {batches})")
        # Warm-up, untimed: every server once at every client count, as the timed rounds will load it. On a
        # GPU each batch size a server meets is captured once (its first steps are slower), and the
        # rows coming and going at 8 clients pass through sizes a load of 16 never shows.
        for _, url in servers.values():
            for clients in sorted(set(args.clients), reverse=True):
                load(url, clients, args.requests, args.new)
        note("warmed")
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
        if "batched" in servers and max(args.clients) > 1:
            top = max(args.clients)
            late = late_arrival(servers["batched"][1], top, args.new)
            step_s = top / figures[f"batched/{top}"]["tokens_per_s"]  # one decode step of the loaded batch
            figures["late"] = {**late, "alone_ttft_s": figures["batched/1"]["ttft_p50_s"] if 1 in args.clients else None,
                               "step_s": step_s}
            note("late arrival: " + json.dumps(figures["late"]))
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    for clients in args.clients:
        for name in servers:
            if name != "batched" and "batched" in servers:
                figures[f"ratio/{clients}/batched_over_{name}"] = (figures[f"batched/{clients}"]["tokens_per_s"]
                                                                  / figures[f"{name}/{clients}"]["tokens_per_s"])
        if "batched" in servers:
            figures[f"ratio/{clients}/batched_over_generate"] = (figures[f"batched/{clients}"]["tokens_per_s"]
                                                                / figures[f"generate/{clients}"]["tokens_per_s"])
    dump({"model": args.model, "stages": args.stages, "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
          "requests_per_client": args.requests, "new_tokens": args.new, "rounds": args.rounds, "figures": figures}, args.json)
    rows = []
    for clients in args.clients:
        rows.append([str(clients), f"generate() of the batch ({args.stages} stages)",
                     f"{figures[f'generate/{clients}']['tokens_per_s']:.1f}", "-", "-"])
        for name in servers:
            f = figures[f"{name}/{clients}"]
            stages = args.stages if SERVERS[name][0] == "pipeline" else 1
            rows.append([str(clients), f"{name} ({stages} stage{'s' if stages > 1 else ''})", f"{f['tokens_per_s']:.1f}",
                         f"{1000 * f['ttft_p50_s']:.0f}", f"{1000 * f['ttft_p95_s']:.0f}"])
    print_table(rows, ["clients", "server", "tokens/s", "TTFT p50 ms", "TTFT p95 ms"])


if __name__ == "__main__":
    main()
