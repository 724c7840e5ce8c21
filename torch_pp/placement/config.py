"""Reading just enough of a model to plan it: a config.json (and its safetensors index, if any)."""

from __future__ import annotations

import json
from pathlib import Path

from ..model.loading import INDEX_FILE, ModelFolderError, config_dict


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
