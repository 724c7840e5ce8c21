"""``torch_pp serve``: the real openai client against a real 2-stage server on 127.0.0.1 with the
embedded SmolLM2, compared with single-process transformers; errors, concurrency (continuous
batching: every request equal to it alone), a client gone, a busy server, 64 requests from 16
clients with some cancelled and some bad, a killed stage, and a clean shutdown that ends every
rank (one generate() per request there: ``--batches 0``)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
import torch

from conftest import ROOT, free_port
from torch_pp.default_model import FOLDER_NAME

NAME = FOLDER_NAME
KEY = "test-key"
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello in Spanish.",
           "What do bees make?", "Name a planet.", "What is the opposite of hot?", "How many legs does a cat have?"]


def _launch(port: int, *, nodes: int, extra: list[str], cache) -> list[subprocess.Popen]:
    """The server under real torchrun: one agent with 2 ranks, or (nodes=2) one agent per stage, as
    on two machines, so that a killed stage does not make rank 0's agent stop rank 0 too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_PP_CACHE": str(cache)}
    master = free_port()
    args = ["-m", "torch_pp", "serve", "--port", str(port), "--no-progress", "--dtype", "float32", *extra]
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(node),
               "--nproc-per-node", str(2 // nodes), "--master-addr", "127.0.0.1", "--master-port", str(master), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      start_new_session=True, cwd=ROOT))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return procs
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    _stop(procs)
    raise AssertionError("the server did not come up:\n" + "\n".join(p.stderr.read()[-3000:] for p in procs))


def _stop(procs) -> None:
    """Kill the agents and their workers (torchrun starts each worker in a session of its own)."""
    for p in procs:
        try:
            family = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            try:
                proc.kill()
            except psutil.Error:
                pass


def _worker(procs, rank: int) -> psutil.Process:
    """The stage process of ``rank`` under the torchrun agents."""
    for agent in procs:
        for child in psutil.Process(agent.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "torch_pp" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
    raise AssertionError(f"no process for rank {rank}")


@pytest.fixture(scope="module")
def server(smol_reference, torch_pp_cache):
    port = free_port()
    procs = _launch(port, nodes=2, extra=["--api-key", KEY, "--max-concurrent", "8", "--max-queue", "8"], cache=torch_pp_cache)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield client, port, procs
    _stop(procs)


def _hf(smol_reference, prompt: str, *, chat: bool, max_tokens: int) -> str:
    _, tok, model = smol_reference
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _chat(client, prompt: str, max_tokens: int = 16, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], temperature=0,
                                          max_tokens=max_tokens, **kw)


def test_models_keys_names_and_ranges(server):
    client, port, _ = server
    assert [m.id for m in client.models.list()] == [NAME]
    anonymous = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    for bad, message in [({"top_p": 1.5}, "top_p=1.5 is out of range"), ({"temperature": -1}, "temperature=-1"),
                         ({"max_tokens": 0}, "max_tokens=0 is out of range")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], **{"max_tokens": 4, **bad})


def test_chat_equals_transformers_with_and_without_streaming(server, smol_reference):
    client, _, _ = server
    want = _hf(smol_reference, PROMPTS[0], chat=True, max_tokens=16)
    reply = _chat(client, PROMPTS[0])
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 16
    chunks = list(_chat(client, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reply.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_and_stop_strings(server, smol_reference):
    client, _, _ = server
    want = _hf(smol_reference, "The three primary colours are", chat=False, max_tokens=12)
    got = client.completions.create(model=NAME, prompt="The three primary colours are", temperature=0, max_tokens=12)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
    cut = want.split()[2]  # a word inside the completion: the text ends just before it
    stopped = client.completions.create(model=NAME, prompt="The three primary colours are", temperature=0, max_tokens=12,
                                        stop=[cut])
    assert stopped.choices[0].text == want[:want.index(cut)] and stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_the_same_requests_alone(server):
    client, _, _ = server
    alone = [_chat(client, p, max_tokens=10).choices[0].message.content for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _chat(client, p, max_tokens=10).choices[0].message.content, PROMPTS))
    assert together == alone


def _health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()


def _open_stream(port: int, http: httpx.Client, max_tokens: int = 200):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    return http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"})


def _wait_idle(port: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if _health(port)["requests"] == {"running": 0, "waiting": 0}:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"requests still running after {within_s} s: {_health(port)['requests']}")


def test_a_client_gone_mid_stream_is_cancelled_and_the_server_keeps_serving(server):
    client, port, _ = server
    with httpx.Client(timeout=60) as http, _open_stream(port, http) as response:
        lines = response.iter_lines()
        events = [next(lines) for _ in range(6)]
        assert any(e.startswith("data: {") for e in events)
        health = _health(port)
        assert health["requests"]["running"] == 1
        assert sum(b["rows"] for b in health["batches"]) == 1, health  # its row in one of the running batches
    _wait_idle(port, within_s=3)  # one decode step here is ~0.1 s
    assert _chat(client, PROMPTS[1], max_tokens=4).choices[0].message.content


def test_past_the_queue_requests_get_429_never_a_hang(server):
    _, port, _ = server

    def one(_) -> int:
        with httpx.Client(timeout=120) as http, _open_stream(port, http, max_tokens=24) as response:
            for _ in response.iter_lines():  # read to the end: a slot frees when a request is done
                pass
            return response.status_code

    with concurrent.futures.ThreadPoolExecutor(18) as pool:  # 8 slots and 8 queue places
        statuses = pool.map(one, range(18))
        seen = None
        for _ in range(200):
            seen = _health(port)["requests"]
            if seen["waiting"] == 8:
                break
            time.sleep(0.02)
        statuses = list(statuses)
    assert seen == {"running": 8, "waiting": 8}
    assert sorted(statuses) == [200] * 16 + [429] * 2, statuses
    _wait_idle(port, within_s=10)


def test_64_requests_from_16_clients_some_cancelled_some_bad_each_good_one_as_alone(server):
    client, port, _ = server
    lengths = (5, 11)
    alone = {(p, n): _chat(client, p, max_tokens=n).choices[0].message.content for p in PROMPTS[:4] for n in lengths}

    def one(i: int):
        prompt, n = PROMPTS[i % 4], lengths[(i // 4) % 2]
        if i % 9 == 4:  # bad parameters: a 400, nothing admitted
            try:
                _chat(client, prompt, max_tokens=n, top_p=1.5)
            except openai.BadRequestError:
                return "400"
            return "no 400"
        if i % 7 == 3:  # a client gone mid-stream
            stream = _chat(client, prompt, max_tokens=40, stream=True)
            for k, _ in enumerate(stream):
                if k == 3:
                    break
            stream.close()
            return "cancelled"
        return _chat(client, prompt, max_tokens=n).choices[0].message.content == alone[(prompt, n)]

    def patient(i: int):
        # 16 clients on 8 slots and 8 queue places: a client that just dropped a stream can come
        # back before its request has left (at the next step), and is told 429 as any client would be.
        for _ in range(50):
            try:
                return one(i)
            except openai.RateLimitError:
                time.sleep(0.2)
        return "429 for 10 s"

    def one_client(c: int) -> list:
        return [patient(4 * c + k) for k in range(4)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(one_client, range(16)) for r in rs]
    bad = [i for i in range(64) if i % 9 == 4]
    assert [results[i] for i in bad] == ["400"] * len(bad)
    assert results.count("cancelled") == len([i for i in range(64) if i % 7 == 3 and i % 9 != 4])
    assert all(r is True for r in results if r not in ("400", "cancelled")), results
    _wait_idle(port, within_s=10)
    health = httpx.get(f"http://127.0.0.1:{port}/health", params={"stages": 1}, timeout=30).json()
    assert all(b["rows"] == 0 and b["prefilling"] == 0 and b["queued"] == 0 for b in health["batches"]), health
    assert health["kv_lanes"] == [0], health  # no row or lane left on the other stage
    assert [s["rank"] for s in health["stage_figures"]] == [0, 1] and health["stage_figures"][1]["kv_lanes"] == 0, health


def test_a_killed_stage_gives_503_naming_it(server):
    client, port, procs = server  # the last test on this server
    _worker(procs, 1).kill()
    start = time.monotonic()
    while True:
        try:
            _chat(client, PROMPTS[2], max_tokens=4)
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and "lost stage 1" in str(exc), exc
            break
        assert time.monotonic() - start < 15, "no 503 within 15 s"
        time.sleep(0.2)
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert health.status_code == 503
    assert [s["alive"] for s in health.json()["stages"]] == [True, False]


def test_sigterm_on_rank_0_ends_every_rank_cleanly(smol_reference, torch_pp_cache):
    port = free_port()
    procs = _launch(port, nodes=1, extra=["--batches", "0"], cache=torch_pp_cache)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        reply = _chat(client, PROMPTS[0], max_tokens=8)  # one generate() per request, in its own lane
        assert reply.choices[0].message.content == _hf(smol_reference, PROMPTS[0], chat=True, max_tokens=8)
        assert "batches" not in _health(port)
        ranks = [_worker(procs, r) for r in (0, 1)]
        os.kill(ranks[0].pid, signal.SIGTERM)
        assert procs[0].wait(timeout=30) == 0, procs[0].stderr.read()[-3000:]
        assert not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks)
        out = procs[0].stdout.read()
        assert f"serving {NAME} at http://127.0.0.1:{port}/v1 (2 stages" in out and "one lane per request" in out
        assert "Traceback" not in procs[0].stderr.read()
    finally:
        _stop(procs)
