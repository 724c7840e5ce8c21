"""Reading just enough of a model to plan it: a config.json (and its safetensors index, if any)."""

from __future__ import annotations

import json
from pathlib import Path

from .loading import INDEX_FILE, SUPPORTED_MODEL_TYPES, ModelFolderError


def load_config_only(path: Path):
    """Return ``(config, checkpoint_bytes or None)`` from a model folder or a config.json file.

    Raises:
        ModelFolderError: for a missing file or an unsupported model_type.
    """
    from transformers import AutoConfig

    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelFolderError(f"no config.json at {path}")
    data = json.loads(config_file.read_text())
    model_type = data.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.for_model(model_type, **data)
    index = config_file.parent / INDEX_FILE
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.is_file() else None
    return config, total
