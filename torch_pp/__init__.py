"""torch_pp: run one large language model across several machines, one pipeline stage each.

Public surface::

    import torch_pp
    with torch_pp.start("path/to/hf-model") as pipe:   # under torchrun, on every rank
        if pipe.is_driver:                             # rank 0
            out = pipe.model.generate(input_ids, max_new_tokens=32)
"""

__version__ = "0.1.0"

from .interactive import close_all, join, local_pipeline  # noqa: E402
from .pipeline import Pipeline, start  # noqa: E402
from .plan import PlanError, StagePlan, even_plan, parse_layers  # noqa: E402
from .runtime import PipelineError, StartupError  # noqa: E402

__all__ = [
    "Pipeline", "PipelineError", "PlanError", "StagePlan", "StartupError",
    "close_all", "even_plan", "join", "local_pipeline", "parse_layers", "start", "__version__",
]
