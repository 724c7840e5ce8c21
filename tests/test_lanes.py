"""Sequence lanes: sub-batches in flight at once give transformers' tokens for the same sub-batches."""

import json

import pytest

from conftest import WORKERS, torchrun


@pytest.mark.parametrize("stages", [2, 3])
def test_lanes_equal_transformers_sub_batches(tiny_models, tmp_path, stages):
    run = torchrun(stages, [str(WORKERS / "lanes_worker.py"), str(tiny_models["qwen3"])], env={"OUT": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp_path / "lanes.json").read_text())
    assert r["lanes2"] and r["lanes3"]
    assert r["default"]
    # by default one lane: one prefill plus 19 decode steps
    assert r["default_forwards"] == 20
    assert r["short_ok"] and r["long_ok"], "a lane finishing early disturbed another"
    assert r["single_after"]
    # Lanes run on kept threads (a new thread has no cuDNN attention plans): the second 2-lane call
    # ran on the first one's threads, and the 3-lane call added one thread, not three.
    two, again, three = (set(t) for t in r["lane_threads"])
    assert len(two) == 2 and again == two and two < three and len(three) == 3
    assert r["threads_made"] == 3


def test_kept_threads_reuse_the_warmest_and_pass_errors_on():
    import threading

    from torch_pp.rank0.workers import Workers

    pool = Workers("t")
    first = pool.submit(threading.get_ident).result(timeout=10)
    assert [pool.submit(threading.get_ident).result(timeout=10) for _ in range(3)] == [first] * 3
    gate = threading.Event()
    busy = pool.submit(gate.wait, 10)  # holds the one thread: the next call gets a new one
    other = pool.submit(threading.get_ident).result(timeout=10)
    gate.set()
    assert busy.result(timeout=10) and other != first and pool.threads == 2
    with pytest.raises(KeyError, match="gone"):
        pool.submit(lambda: {}["gone"]).result(timeout=10)
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("t-"))


def test_a_lane_failure_is_raised_as_itself():
    """A sub-batch's own error reaches the caller (nothing sent afterwards can mask it)."""
    import torch

    from torch_pp.rank0.lanes import split_generate

    class Boom(RuntimeError):
        pass

    def generate(*, input_ids, **_):
        if input_ids[0, 0] == 7:
            raise Boom("lane B failed")
        return input_ids

    with pytest.raises(Boom, match="lane B failed"):
        split_generate(generate, lanes=2, pad_with=0, input_ids=torch.tensor([[1, 2], [7, 8]]))


def test_concurrent_calls_take_turns_per_token_in_one_process(tiny_models):
    """With one stage nothing in a call waits on the wire; calls still take turns token by token,
    so a request that arrives while another generates starts at once (a server's promise)."""
    import threading

    import torch
    from transformers.generation.streamers import BaseStreamer

    import torch_pp

    order: list[str] = []
    started = threading.Event()

    class Record(BaseStreamer):
        def __init__(self, name):
            self.name, self.puts = name, 0

        def put(self, value):
            self.puts += 1
            if self.puts > 1:  # the first put is the prompt
                order.append(self.name)
            if self.puts == 4:
                started.set()

        def end(self):
            pass

    kw = dict(do_sample=False, pad_token_id=0)
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    with torch_pp.local_pipeline(tiny_models["llama"], stages=1, progress=False, dtype="float32") as pipe:
        alone_a = pipe.model.generate(a, max_new_tokens=60, min_new_tokens=60, **kw)
        alone_b = pipe.model.generate(b, max_new_tokens=5, min_new_tokens=5, **kw)
        out = {}
        long = threading.Thread(target=lambda: out.update(a=pipe.model.generate(
            a, max_new_tokens=60, min_new_tokens=60, streamer=Record("a"), **kw)))
        long.start()
        assert started.wait(60)
        out["b"] = pipe.model.generate(b, max_new_tokens=5, min_new_tokens=5, streamer=Record("b"), **kw)
        long.join(60)
    assert order.count("a") == 60 and order.count("b") == 5
    last_b = len(order) - 1 - order[::-1].index("b")
    assert order[last_b + 1:].count("a") > 40, f"the second call waited for the first: {''.join(order)}"
    assert torch.equal(out["a"], alone_a) and torch.equal(out["b"], alone_b)
