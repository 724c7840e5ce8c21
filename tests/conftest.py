"""Shared test fixtures: tiny models written by the tests, free ports, real torchrun launches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHS, write_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tests compare with transformers on the CPU: keep every pipeline there, on GPU machines too
# (tests that want an accelerator pass a device explicitly). TORCH_PP_TEST_DEVICE=mps (or cuda)
# runs the device-aware tests there instead, with the reference model on the same device (see
# docs/macs.md, "Running on Macs"): split equals whole, prefill, lanes and SmolLM2.
TEST_DEVICE = os.environ.get("TORCH_PP_TEST_DEVICE", "cpu")
os.environ.setdefault("TORCH_PP_DEVICE", TEST_DEVICE)
os.environ.setdefault("TEST_DEVICE", TEST_DEVICE)
# A placement measured by one test must not move another's layers (tiny models written with one
# seed share a fingerprint): kept placements are off, except where a test names its own folder.
os.environ["TORCH_PP_PLACEMENTS"] = "off"
WORKERS = Path(__file__).parent / "workers"

from torch_pp.net.rendezvous import free_port  # noqa: E402,F401 - the tests' one free_port


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def torchrun(nproc: int, args: list[str], *, timeout: float = 300, env: dict | None = None, module: bool = False) -> Run:
    """Launch ``torchrun`` on 127.0.0.1 with a free port; kill the whole process group on timeout."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
    ]
    cmd += (["-m"] if module else []) + args
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} did not finish within {timeout}s\nstderr:\n{err[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # no orphan workers, whatever happened
        except ProcessLookupError:
            pass
    return Run(proc.returncode, out, err, time.monotonic() - start)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every test architecture as a single-file and a sharded checkpoint: name -> folder."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for arch in ARCHS:
        models[arch] = write_tiny_model(arch, root / arch)
        models[f"{arch}-sharded"] = write_tiny_model(arch, root / f"{arch}-sharded", sharded=True)
    return models


@pytest.fixture(scope="session")
def torch_pp_cache(tmp_path_factory) -> Path:
    """Where the embedded model is converted: TORCH_PP_CACHE if set (CI reuses it), else a fresh folder."""
    return Path(os.environ.get("TORCH_PP_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def smol_reference(torch_pp_cache):
    """The embedded SmolLM2 (converted into the test cache): its folder, tokenizer and the whole
    model in this process, in float32 on the CPU (the single-process transformers reference)."""
    os.environ["TORCH_PP_CACHE"] = str(torch_pp_cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch_pp.default_model import ensure_default_model

    folder = ensure_default_model(progress=False)
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
