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
# Compiles one compiled forward may hold. Each works on rows [N, last dim] (see ``_Routed``), but
# one class serves several call sites (Qwen3's norm: the hidden state, and each head's queries and
# keys), N is 1 or more (a size of 1 is compiled apart) and dtypes differ between pipelines: past
# torch's default of 8 a compile fails outright (fullgraph), which turned fusion off for good.
RECOMPILE_LIMIT = 64
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
        if _broken or kwargs or len(args) != 1 or not self.when():
            return kind.forward(self.module, *args, **kwargs)
        fn = _compiled.get(kind)
        if fn is None:
            # dynamic=None: the first row count compiles static, a second once more with a symbolic one
            fn = _compiled[kind] = torch.compile(kind.forward, fullgraph=True)
        # [..., D] -> rows [N, D]: norms and MLPs work on the last dimension alone, so every batch
        # size and step length is one row count (a shape of its own would be a compile of its own)
        x = args[0]
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = fn(self.module, x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])
