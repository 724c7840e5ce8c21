"""The performance report's pieces: spans from every stage, a valid Chrome trace, a timeline PNG, a measured plan."""

import json

import torch
from tiny_models import write_tiny_model

import torch_pp
from torch_pp import perf
from torch_pp.trace import now


def test_trace_has_spans_for_every_stage(tiny_models, tmp_path):
    with torch_pp.local_pipeline(tiny_models["llama"], stages=3, progress=False) as pipe:
        t0 = now()
        pipe.model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        t1 = now()
        stages = pipe.stats(spans_since=t0)
    perf.write_trace(stages, str(tmp_path / "trace.json"), start=t0)
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for rank in range(3):
        mine = [e for e in events if e["tid"] == rank]
        assert {e["name"] for e in mine} >= {"compute", "send"}, f"stage {rank}: {sorted({e['name'] for e in mine})}"
        # spans may begin before t0 (a stage already waiting) but all end inside the window
        assert all(e["dur"] > 0 and e["ts"] + e["dur"] >= 0 for e in mine)
    names = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert len(names) == 3
    shares = perf.breakdown(stages, start=t0, end=t1)
    assert [b["rank"] for b in shares] == [0, 1, 2]
    assert all(b["compute_s"] > 0 for b in shares)
    # One stream: the stages take turns, so their compute never overlaps and fits in the window...
    assert sum(b["compute_s"] for b in shares) <= (t1 - t0) * 1.02
    # ...and each request's time on rank 0, from the start of its send to the end of the wait for its
    # reply, covers the other stages' compute for it (a span booked to the wrong kind, or clocks that
    # disagree between processes, breaks this). Sends count too: a busy machine can pause rank 0
    # between its send and its wait while the next stage already computes.
    spans = [(name, a, b) for name, a, b in stages[0]["spans"] if a >= t0 and b <= t1]
    covered, sent = 0.0, None
    for name, a, b in spans:
        if name == "send" and sent is None:
            sent = a
        elif name == "wait" and sent is not None:
            covered, sent = covered + b - sent, None
    remote = sum(b["compute_s"] for b in shares[1:])
    assert covered >= 0.9 * remote, (covered, remote)
    # One stream: no two stages ever compute at the same moment (up to the processes' clock offsets).
    compute = {s["rank"]: [(a, b) for name, a, b in s["spans"] if name == "compute" and b > t0 and a < t1] for s in stages}
    overlap = sum(max(0.0, min(b1, b2) - max(a1, a2))
                  for r1 in compute for r2 in compute if r1 < r2 for a1, b1 in compute[r1] for a2, b2 in compute[r2])
    assert overlap < 1e-3, f"stages computed at once for {overlap * 1000:.2f} ms"
    perf.plot_timeline(stages, str(tmp_path / "timeline.png"), start=t0, end=t1)
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balanced_plan_moves_layers_off_the_most_occupied_stage(tmp_path):
    model = write_tiny_model("llama", tmp_path / "llama12", layers=12)
    with torch_pp.local_pipeline(model, stages=2, layers="0:11,11:12", progress=False) as pipe:
        ids = torch.tensor([[1, 5, 9, 3]] * 4)
        pipe.model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        t0 = now()
        pipe.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        t1 = now()
        stages = pipe.stats(spans_since=t0)
        plan = pipe.balanced_plan(spans_since=t0, until=t1)
    shares = perf.breakdown(stages, start=t0, end=t1)
    # Rank 0's own layers are told apart from its embedding and head, inside its compute; a stage's
    # layers are its compute; nothing occupies a stage longer than the window.
    assert 0 < shares[0]["layers_s"] < shares[0]["compute_s"] <= shares[0]["occupied_s"] <= (t1 - t0) * 1.01
    assert shares[1]["layers_s"] == shares[1]["compute_s"] > 0
    assert any(name == "layers" for name, _, _ in stages[0]["spans"])
    # Rank 0 held 11 of the 12 layers besides its head: the measured plan moves layers to stage 1.
    assert plan.num_layers == 12 and plan.ranges[0][0] == 0 and plan.ranges[-1][1] == 12
    assert plan.ranges[0][1] < 11, plan
