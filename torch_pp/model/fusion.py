"""A captured decode step's elementwise work fused by inductor (torch.compile), on CUDA only.

Why: replayed as one CUDA graph (``model.graphs``), a step of transformers' eager layers still
runs each elementwise operation as a kernel of its own: an RMSNorm is eight (casts, square, mean,
rsqrt, two products), an MLP's activation and product two more. At one token each kernel is a
couple of microseconds of a GPU that has little to do, a few dozen per layer; transformers'
compiled static-cache decoding fuses them, which was most of what still separated a captured
step from it (``bench/RESULTS.md``, "fused steps").

So while a slot records a step (``graphs.Slot``: on the streams it records on), each decoder
layer's norms and MLP call a compiled version of their own class's ``forward``: one compile per
class and input shape, shared by every layer (the parameters are the compiled function's inputs,
not constants), made before the step is captured. Everywhere else (prefills, other threads, eager
steps) the very same modules run their eager ``forward``. Only transformers' own modules run: nothing is rewritten.
``devices.fuses`` says where it is used (CUDA with triton; ``TORCH_PP_FUSE=0`` turns it off).
Pure model math: no communication.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger("torch_pp")

# Class-name endings of the submodules fused (llama, mistral, qwen2, qwen3: q_norm and k_norm too).
KINDS = ("RMSNorm", "MLP")
_compiled: dict[type, Callable] = {}  # module class -> its compiled forward(module, *args)
_broken: list[str] = []  # why compiling failed, once it has: every step then runs unfused


def prepare(layers: Iterable[nn.Module | Callable], *, when: Callable[[], bool]) -> int:
    """Route the fusable submodules of ``layers`` (modules, or their bound ``forward``) through
    ``_Routed``, once per module: compiled where ``when()`` says so at the call (and compiling
    works), eager otherwise. Returns how many are routed."""
    routed = 0
    for layer in layers:
        for module in getattr(layer, "__self__", layer).modules():
            if type(module).__name__.endswith(KINDS):
                if not isinstance(module.__dict__.get("forward"), _Routed):
                    module.forward = _Routed(module, when)
                routed += 1
    return routed


def usable() -> bool:
    """False once a compile has failed here."""
    return not _broken


def warm(run: Callable[[], object]) -> bool:
    """Run ``run()`` (a step where the routed modules' ``when`` holds), compiling what it needs,
    before a capture (compiling cannot be captured); False, with a warning, if compiling fails:
    then every step runs unfused."""
    if _broken:
        return False
    try:
        run()
        return True
    except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported op: the step runs unfused
        log.warning("captured decode steps run unfused: compiling their norms and MLPs failed (%s)",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _broken.append(str(exc))
        return False


class _Routed:
    """A module's ``forward``: compiled where ``when()`` holds, eager otherwise."""

    def __init__(self, module: nn.Module, when: Callable[[], bool]) -> None:
        self.module, self.when = module, when

    def __call__(self, *args, **kwargs):
        kind = type(self.module)
        if not _broken and self.when():
            fn = _compiled.get(kind)
            if fn is None:
                # dynamic=None: the first shape (the one-token step) compiles static, a second
                # (a verification step, another batch) once more with symbolic sizes.
                fn = _compiled[kind] = torch.compile(kind.forward, fullgraph=True)
            return fn(self.module, *args, **kwargs)
        return kind.forward(self.module, *args, **kwargs)
