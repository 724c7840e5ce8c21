"""Reading a model folder's config: config.json (checked) and, for planning, its safetensors index.

Pure: JSON only, transformers imported when a config object is wanted. The one reader of
config.json in the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelFolderError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "deepseek_v3")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def config_dict(config_file: Path) -> dict:
    """A config.json's contents, checked: valid JSON naming a supported ``model_type``.

    Raises:
        ModelFolderError: naming the file, for a missing or unreadable file, invalid JSON or an
            unsupported model_type.
    """
    if not config_file.is_file():
        raise ModelFolderError(f"{config_file.parent} has no config.json; point --model at a Hugging Face model folder")
    try:
        data = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{config_file} (in model folder {config_file.parent}) is not valid JSON: {exc}; "
                               "fix the file or copy it again from the model's source") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{config_file} (in model folder {config_file.parent}) holds no JSON object")
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(
            f"model_type {model_type!r} in {config_file} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return data


def read_config(model_dir: str | os.PathLike):
    """Read and check a model folder's config.

    Raises:
        ModelFolderError: for a missing folder, no or bad config.json, or an unsupported model_type.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    config_dict(path / "config.json")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_config_only(path: Path):
    """Return ``(config, checkpoint_bytes or None)`` from a model folder or a config.json file.

    Raises:
        ModelFolderError: for a missing file or an unsupported model_type.
    """
    from transformers import AutoConfig

    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelFolderError(f"no config.json at {path}")
    data = config_dict(config_file)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    index = config_file.parent / INDEX_FILE
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.is_file() else None
    return config, total
