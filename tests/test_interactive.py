"""The Python API for interactive use: local pipelines, joining remote workers, clean closing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

import torch_pp
from conftest import ROOT, WORKERS, free_port


def wait_gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def test_start_generate_close_start_again(tiny_models):
    path = tiny_models["llama"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33]])
    want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for stages in (2, 3):
        pipe = torch_pp.local_pipeline(path, stages=stages, progress=False)
        workers = [p.pid for p in psutil.Process().children()]
        assert len(workers) == stages - 1
        assert torch.equal(pipe.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), want)
        pipe.close()
        pipe.close()  # twice is harmless
        assert wait_gone(workers) == [], "workers left after close"
    # Re-running the cell: a second pipeline closes the first one's workers.
    torch_pp.local_pipeline(path, stages=2, progress=False)
    first_workers = [p.pid for p in psutil.Process().children()]
    second = torch_pp.local_pipeline(path, stages=2, progress=False)
    assert wait_gone(first_workers) == []
    assert torch.equal(second.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), want)
    torch_pp.close_all()
    assert wait_gone([p.pid for p in psutil.Process().children()]) == []


def test_text_iterator_streamer(tiny_models):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0")))
    with torch_pp.local_pipeline(tiny_models["qwen2"], stages=2, progress=False) as pipe:
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        ids = torch.tensor([[1, 5, 9, 33]])
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("out", pipe.model.generate(
            ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)))
        thread.start()
        pieces = list(streamer)
        thread.join(timeout=60)
    text = "".join(pieces).split()
    assert text == [f"w{i}" for i in result["out"][0, 4:].tolist()]


def test_killed_driver_leaves_no_workers(tiny_models):
    proc = subprocess.Popen([sys.executable, str(WORKERS / "driver_script.py"), str(tiny_models["llama"]), "hang"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    workers = json.loads(proc.stdout.readline())["workers"]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    assert wait_gone(workers, timeout=20) == [], "workers outlived their driver"


def test_interrupt_leaves_the_pipeline_usable(tiny_models):
    out = subprocess.run([sys.executable, str(WORKERS / "driver_script.py"), str(tiny_models["llama"]), "interrupt"],
                         capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"interrupted": True, "usable": True}, out.stderr[-3000:]


def test_no_python_code_runs_when_a_lane_cache_dies():
    """An interrupt is dropped by CPython if it lands in a weakref callback or finalizer, and every
    generate() drops its cache on return (once in CI, a Ctrl-C was lost that way): rank 0's lanes
    notice dead caches without running any code at their death."""
    from transformers import DynamicCache

    from torch_pp.rank0.lanes import CacheLanes

    lanes = CacheLanes()
    cache = DynamicCache()
    lane = lanes.lane_of(cache)
    assert lanes.lane_of(cache) == lane and lanes.take_freed() == []
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_name) if event == "call" else None)
    try:
        del cache
    finally:
        sys.setprofile(None)
    assert calls == []
    assert lanes.take_freed() == [lane] and lanes.take_freed() == []


def test_a_new_cache_at_a_dead_caches_address_gets_a_new_lane():
    from transformers import DynamicCache

    from torch_pp.rank0.lanes import CacheLanes

    lanes = CacheLanes()
    for _ in range(1000):  # CPython reuses a freed object's memory for the next one of its size
        old = DynamicCache()
        address, lane = id(old), lanes.lane_of(old)
        del old
        new = DynamicCache()
        if id(new) == address:
            break
        lanes.take_freed()
    assert id(new) == address
    assert lanes.lane_of(new) != lane
    assert lanes.take_freed() == [lane]  # the dead one's lane is still handed back


@pytest.mark.parametrize("when", ["idle", "busy"])
def test_lost_worker_fails_calls_but_not_the_kernel(tiny_models, when):
    out = subprocess.run([sys.executable, str(WORKERS / "driver_script.py"), str(tiny_models["llama"]), f"lose-{when}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]  # the driver process lived on
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] and "lost stage 2 on" in result["error"] and "(layers" in result["error"], result
    assert "start a new one" in result["error"]
    assert result["seconds"] < 5, result  # a local death is seen at once (even before the worker is reaped)
    assert result["again"] == result["error"]  # later calls fail the same way, at once
    assert result["usable"] is True  # and a fresh pipeline works in the same process


def test_join_workers_started_by_torchrun(tiny_models):
    port = free_port()
    path = tiny_models["mistral"]
    workers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                          "-m", "torch_pp", "worker", "--driver", f"127.0.0.1:{port}", "--rank", str(r), "--stages", "3"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for r in (1, 2)
    ]
    try:
        pipe = torch_pp.join(path, stages=3, port=port, progress=False)
        assert [h["pid"] for h in pipe.transport.hellos.values()][0] == os.getpid()
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = torch.tensor([[1, 5, 9, 33]])
        kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(pipe.model.generate(ids, **kw), ref.generate(ids, **kw))
        assert [s["rank"] for s in pipe.stats()] == [0, 1, 2]
        pipe.close()
        for w in workers:
            assert w.wait(timeout=30) == 0, w.stderr.read()[-2000:]
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)


def test_single_stage_local_pipeline(tiny_models):
    path = tiny_models["llama"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33]])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch_pp.local_pipeline(path, stages=1, progress=False) as pipe:
        assert psutil.Process().children() == []
        assert torch.equal(pipe.model.generate(ids, **kw), ref.generate(ids, **kw))
        assert [s["rank"] for s in pipe.stats()] == [0]


def test_a_bad_option_leaves_nothing_behind(tiny_models):
    """A typo in a notebook cell fails at once, and the next cell starts a pipeline normally."""
    path = tiny_models["llama"]
    with pytest.raises(TypeError, match="bogus"):
        torch_pp.local_pipeline(path, stages=2, bogus=1)
    with pytest.raises(torch_pp.OptionsError, match="balance"):
        torch_pp.local_pipeline(path, stages=2, balance="fastest")
    with pytest.raises(torch_pp.OptionsError, match="prefill_chunk"):
        torch_pp.local_pipeline(path, stages=2, prefill_chunk=-4)
    assert psutil.Process().children() == [], "workers started for options that were refused"
    assert not torch.distributed.is_initialized()
    # A failure after the group formed (a model folder that does not exist) leaves nothing either.
    with pytest.raises(torch_pp.StartupError, match="does not exist"):
        torch_pp.local_pipeline(path.parent / "no-such-model", stages=2, progress=False)
    assert not torch.distributed.is_initialized()
    assert wait_gone([p.pid for p in psutil.Process().children()]) == []
    with torch_pp.local_pipeline(path, stages=2, progress=False) as pipe:
        ids = torch.tensor([[1, 5, 9, 33]])
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert torch.equal(pipe.model.generate(ids, max_new_tokens=6, do_sample=False),
                           ref.generate(ids, max_new_tokens=6, do_sample=False))


def test_a_dropped_pipeline_is_closed_by_the_next_one(tiny_models):
    """A pipeline whose last reference is dropped without close() does not leak its workers or its group."""
    import gc

    path = tiny_models["llama"]
    pipe = torch_pp.local_pipeline(path, stages=2, progress=False)
    first_workers = [p.pid for p in psutil.Process().children()]
    del pipe
    gc.collect()
    with torch_pp.local_pipeline(path, stages=3, progress=False) as second:
        assert wait_gone(first_workers) == [], "the dropped pipeline's workers outlived it"
        assert second.model.generate(torch.tensor([[1, 5]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    assert wait_gone([p.pid for p in psutil.Process().children()]) == []
