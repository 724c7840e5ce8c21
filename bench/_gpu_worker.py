"""gpu_report.py's worker: one contender, loaded once, answering the orchestrator's turns.

    python _gpu_worker.py hf DIR          # transformers on one GPU (cuda:0)
    python _gpu_worker.py hf-static DIR   # the same with a StaticCache passed to generate() (it compiles the decode forward)
    python _gpu_worker.py balanced DIR    # transformers + accelerate, device_map="balanced" over every GPU
    torchrun --nproc-per-node 2 _gpu_worker.py pipeline DIR   # torch_pp, one stage per GPU (both on one GPU if it is alone)
    torchrun --nproc-per-node 1 _gpu_worker.py pipeline DIR   # torch_pp, one process
    torchrun --nproc-per-node 2 _gpu_worker.py pipeline-eager DIR   # the same with graphs=False

Each turn is a JSON spec (see ``measure``); before its first turn the worker runs every spec
once, so that every sequence length has been seen and no timed run pays for compilation or
allocation. Every contender runs the attention kernels torch_pp chooses
(``devices.choose_attention_kernels``: not cuDNN's, which builds a plan for every new shape, 55-70 ms
each for a batch of 8 on an H200). ``hf-static`` runs every spec twice before timing (the first
call compiles, the second records CUDA graphs) and reports each spec's first-call time over a warm
one as its compile time.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import serve_turns  # noqa: E402

KIND, MODEL = sys.argv[1], sys.argv[2]
SPECS = json.loads(os.environ["BENCH_SPECS"])  # every spec this run will ask for, to warm them all
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a smoke test of the report itself
START = json.loads(os.environ.get("BENCH_START") or "{}")  # more start() options for torch_pp
DTYPE = os.environ.get("BENCH_DTYPE", "bfloat16")  # float32 for a CPU's figures (bf16 is slow there)
VOCAB_LOW = 1000
STATIC_STEP = 256  # hf-static's cache length: each spec's tokens rounded up to this (one compile per size)
_static_caches: dict = {}


def static_cache(model, batch: int, tokens: int):
    """A StaticCache for ``batch`` rows of ``tokens`` (rounded up), made once and reset per call: the
    compiled forward sees the same cache, so it compiles once per size and batch."""
    from transformers import StaticCache

    size = -(-tokens // STATIC_STEP) * STATIC_STEP
    cache = _static_caches.get((batch, size))
    if cache is None:
        cache = _static_caches[(batch, size)] = StaticCache(config=model.config, max_cache_len=size)
    else:
        with torch.inference_mode():  # its tensors were made in the timed runs' inference mode
            cache.reset()
    return cache


def prompt(length: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(length * 31 + batch)
    return torch.randint(VOCAB_LOW, 30000, (batch, length), generator=g)


def sync() -> None:
    if DEVICE == "cuda":
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def measure(model, device, spec: dict) -> dict:
    """One timed run, or with ``reps`` the median of that many back to back (each field's own
    median). ``decode``: one stream of ``new`` tokens (TTFT and decode tok/s); ``ttft``: a
    ``len``-token prompt's first token; ``batch``: ``batch`` sequences of ``new`` greedy tokens."""
    runs = [measure_once(model, device, spec) for _ in range(spec.get("reps", 1))]
    out = dict(runs[-1])
    for field in ("wall_s", "ttft_s", "decode_tokens_per_s", "tokens_per_s"):
        values = [r[field] for r in runs if r.get(field) is not None]
        if values:
            out[field] = statistics.median(values)
    return out


def measure_once(model, device, spec: dict) -> dict:
    from torch_pp.streamers import TokenTimer

    kw = dict(do_sample=False, pad_token_id=0)
    if spec.get("lanes") is not None:
        kw["lanes"] = spec["lanes"]
    if hasattr(model, "prefill_chunk"):
        model.prefill_chunk = spec.get("chunk")  # None: the default rule
    ids = prompt(spec.get("len", 32), spec.get("batch", 1)).to(device)
    new = spec.get("new", 1)
    if KIND == "hf-static":  # the keyword became ``cache`` in transformers 5.24
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kw[name] = static_cache(model, ids.shape[0], ids.shape[1] + new)
    timer = TokenTimer()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             streamer=timer if ids.shape[0] == 1 else None, **kw)
    sync()
    wall = time.perf_counter() - start
    result = {"wall_s": wall, "tokens": out[:, ids.shape[1]:].tolist()}
    if ids.shape[0] == 1:
        result.update(ttft_s=timer.ttft_s, decode_tokens_per_s=timer.decode_tokens_per_s)
    result["tokens_per_s"] = ids.shape[0] * new / wall
    return result


def profile(model, device) -> dict | None:
    """Where one decode token's time goes (CUDA; torch.profiler): GPU operations launched, device
    busy time (their summed durations) and wall time per token, and the device's idle share. Per
    token as the difference of a 33-token and a 1-token stream over 32 tokens (the prompt's prefill
    cancels). In a pipeline only this process's work is seen (rank 0's; a stage on another process
    shows in ``per_step_ms_by_stage``)."""
    if DEVICE != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    seen = {}
    for new in (1, 33, 1, 33):  # the first pair warms the profiler itself
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            measure_once(model, device, {"len": 32, "new": new})
            wall = time.perf_counter() - start
        gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        seen[new] = (len(gpu), sum(e.time_range.elapsed_us() for e in gpu) / 1e6, wall)
    (ops1, busy1, wall1), (ops33, busy33, wall33) = seen[1], seen[33]
    busy, wall = (busy33 - busy1) / 32, (wall33 - wall1) / 32
    return {"gpu_ops_per_token": (ops33 - ops1) / 32, "device_busy_ms_per_token": 1000 * busy,
            "wall_ms_per_token": 1000 * wall, "device_idle_share": 1 - busy / wall if wall > 0 else None}


def memory() -> list[int]:
    if DEVICE != "cuda":
        from torch_pp.devices import peak_rss_bytes

        return [peak_rss_bytes()]
    return [int(torch.cuda.max_memory_allocated(d)) for d in range(torch.cuda.device_count())]


def main() -> None:
    torch.set_num_threads(1)
    if KIND.startswith("pipeline"):
        import torch_pp

        pipe = torch_pp.start(MODEL, dtype=DTYPE, device=DEVICE, progress=False,
                              **{"graphs": False if KIND == "pipeline-eager" else None, **START})
        if not pipe.is_driver:
            return
        model, device = pipe.model, pipe.device
    else:
        from transformers import AutoModelForCausalLM

        from torch_pp.devices import choose_attention_kernels

        # The attention kernels torch_pp's start chooses (cuDNN's off, which plans every new shape),
        # so that the tokens compare like for like and no contender's figure is a kernel choice.
        choose_attention_kernels(torch.device(DEVICE))
        placement = {"device_map": "balanced"} if KIND == "balanced" else {}
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=getattr(torch, DTYPE), **placement).eval()
        device = torch.device("cuda:0" if DEVICE == "cuda" else DEVICE)
        if KIND in ("hf", "hf-static"):
            model = model.to(device)
        pipe = None
    compile_s = {}
    for spec in SPECS:  # warm every length and mode once (hf-static: twice, compiling, then recording graphs)
        if KIND == "hf-static":
            first = measure_once(model, device, spec)["wall_s"]
            measure_once(model, device, spec)
            compile_s[json.dumps(spec, sort_keys=True)] = first - measure_once(model, device, spec)["wall_s"]
        else:
            measure(model, device, spec)
    def run(spec: dict) -> dict:
        return measure(model, device, spec)

    def finish() -> dict:
        profiled = profile(model, device)
        if pipe is None:
            return {"peak_memory_bytes": memory(), "profile": profiled, **({"compile_s": compile_s} if compile_s else {})}
        stages = pipe.stats()
        figures = {"stages": [{k: s[k] for k in ("rank", "layers", "device", "dtype", "peak_memory_bytes", "weight_bytes",
                                                 "graphs", "fused", "graph_steps", "slot_steps", "eager_steps", "head_rows", "head_steps")
                                 if k in s}
                              for s in stages]}
        # The wire's share, on one stream of decode alone (lanes and prefill runs would blur it): rank 0's
        # waits for the stages minus their compute, and where one decode step's time goes per stage.
        from torch_pp.trace import now

        remote0, calls0, t0 = pipe.rank0.timer.remote_s, pipe.rank0.timer.calls, now()
        run_ = measure(model, device, {"len": 32, "new": 33})
        after = pipe.stats(spans_since=t0)
        remote_s = pipe.rank0.timer.remote_s - remote0
        remote_compute = sum(s["compute_s"] - b["compute_s"] for s, b in zip(after[1:], stages[1:]))
        comm = remote_s - remote_compute
        figures["communication_share"] = comm / run_["wall_s"]
        figures["per_boundary_ms"] = 1000 * comm / max(1, (pipe.rank0.timer.calls - calls0) * pipe.transport.world_size)
        figures["per_step_ms_by_stage"] = [
            {name: round(1000 * sum(b - max(a, t0) for n, a, b in s["spans"] if n == name) / 33, 3)
             for name in ("compute", "send", "wait")} for s in after]
        figures["profile"] = profiled
        pipe.close()
        return figures

    serve_turns(run, finish)


if __name__ == "__main__":
    main()
