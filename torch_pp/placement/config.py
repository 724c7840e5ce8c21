"""Reading a model folder's config: config.json (checked) and, for planning, its safetensors index.

Pure: JSON only, transformers imported when a config object is wanted. The one reader of
config.json in the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import archs
from ..errors import ModelFolderError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def config_dict(config_file: Path) -> dict:
    """A config.json's contents, checked: valid JSON naming a ``model_type`` (which one is
    ``archs.check_config``'s to judge, once transformers has read it).

    Raises:
        ModelFolderError: naming the file, for a missing or unreadable file, invalid JSON or no model_type.
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
    if not isinstance(data.get("model_type"), str):
        raise ModelFolderError(f"{config_file} names no model_type; is this a Hugging Face model folder?")
    return data


def read_config(model_dir: str | os.PathLike):
    """Read and check a model folder's config.

    Raises:
        ModelFolderError: for a missing folder, no or bad config.json, or an unsupported model_type.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    data = config_dict(path / "config.json")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (KeyError, ValueError) as exc:  # a model_type the installed transformers does not know
        raise ModelFolderError(f"model_type {data['model_type']!r} in {path / 'config.json'} is unknown to the installed "
                               f"transformers: {exc}") from None
    archs.check_config(config, where=str(path / "config.json"))
    return config


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
    model_type = data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (KeyError, ValueError) as exc:
        raise ModelFolderError(f"model_type {model_type!r} in {config_file} is unknown to the installed transformers: {exc}") from None
    archs.check_config(config, where=str(config_file))
    index = config_file.parent / INDEX_FILE
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.is_file() else None
    return config, total
