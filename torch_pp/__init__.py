"""torch_pp: run one large language model across several machines, one pipeline stage each.

Public surface::

    import torch_pp
    with torch_pp.start("path/to/hf-model") as pipe:   # under torchrun, on every rank
        if pipe.is_driver:                             # rank 0
            out = pipe.model.generate(input_ids, max_new_tokens=32)

The names below are imported on first use, so that ``python -m torch_pp`` can refuse bad
command-line input before torch and transformers are imported (seconds per process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "Pipeline": "pipeline", "start": "pipeline",
    "close_all": "interactive", "join": "interactive", "local_pipeline": "interactive",
    "StagePlan": "placement.plan", "even_plan": "placement.plan", "parse_layers": "placement.plan",
    "StartOptions": "options", "Settings": "options",
    **{name: "errors" for name in ("TorchPPError", "OptionsError", "PlanError", "ModelFolderError", "DeviceError",
                                   "StartupError", "PipelineError", "StageError", "TransportError", "WireError",
                                   "UnsupportedGenerationError", "DefaultModelError")},
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torch_pp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .interactive import close_all, join, local_pipeline
    from .errors import (DefaultModelError, DeviceError, ModelFolderError, OptionsError, PipelineError, PlanError, StageError,
                         StartupError, TorchPPError, TransportError, UnsupportedGenerationError, WireError)
    from .options import Settings, StartOptions
    from .pipeline import Pipeline, start
    from .placement.plan import StagePlan, even_plan, parse_layers
