"""No silent hangs: a killed stage, Ctrl-C on rank 0, and an idle pipeline (real torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import ROOT, WORKERS, free_port, torchrun

LIMIT_S = 15


def start_generation(cache, nproc: int):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "torch_pp", "generate", "--prompt", "Tell me a long story about cables.", "--chat",
        "--max-new-tokens", "2000", "--min-new-tokens", "2000", "--no-progress",
    ]
    env = {**os.environ, "TORCH_PP_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    os.set_blocking(proc.stdout.fileno(), False)
    deadline, seen = time.monotonic() + 240, b""
    while time.monotonic() < deadline and len(seen) < 40:  # generation is under way once text streams
        chunk = proc.stdout.read()
        seen += chunk or b""
        if proc.poll() is not None:
            raise AssertionError(f"torchrun ended early: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.2)
    assert len(seen) >= 40, "no streamed text within 240 s"
    return proc


def worker_pid(proc, rank: int) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "torch_pp" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def finish(proc) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, proc.stderr.read().decode(), time.monotonic() - start


def survivors(proc) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_killed_stage_stops_every_rank_with_its_name(torch_pp_cache):
    proc = start_generation(torch_pp_cache, 3)
    victim = worker_pid(proc, 1)
    others = [worker_pid(proc, 0), worker_pid(proc, 2)]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for pid in others:
        try:
            psutil.Process(pid).wait(timeout=LIMIT_S + 5)
        except psutil.NoSuchProcess:
            pass
    stopped_within = time.monotonic() - killed_at
    code, err, _ = finish(proc)
    assert code != 0
    assert stopped_within <= LIMIT_S, f"other ranks took {stopped_within:.1f}s"
    assert "lost stage 1 on" in err and "layers 10:20" in err, err[-3000:]


def test_ctrl_c_on_rank0_stops_every_rank(torch_pp_cache):
    proc = start_generation(torch_pp_cache, 2)
    os.kill(worker_pid(proc, 0), signal.SIGINT)
    code, err, seconds = finish(proc)
    assert code != 0
    assert seconds <= LIMIT_S
    assert "Ctrl-C: stopping every stage" in err, err[-3000:]
    assert "Traceback" not in err.split("Ctrl-C")[0][-500:]


def test_idle_pipeline_survives_and_answers(tiny_models, tmp_path):
    run = torchrun(2, [str(WORKERS / "idle_worker.py"), str(tiny_models["llama"])],
                   env={"OUT": str(tmp_path), "TORCH_PP_STALE_S": "3", "IDLE_S": "12"}, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "idle.txt").read_text() == "ok"
