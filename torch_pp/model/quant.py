"""Weight-only int8 quantization of a stage's linear layers, done tensor by tensor while it loads.

``Int8Linear`` keeps a ``[out, in]`` int8 weight and one scale per output channel, and multiplies
with PyTorch's own weight-only kernel (``torch._weight_int8pack_mm``: CPU, CUDA and MPS), so the
activations stay in the compute dtype. The loader replaces a decoder layer's ``nn.Linear`` the
moment its weight is read, so a stage never holds its full-precision share. Embeddings, the LM
head and fused MoE expert tensors (not ``nn.Linear``) stay in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeviceError
from ..options import QUANTIZE_MODES as MODES


class Int8Linear(nn.Module):
    """A linear layer with a per-output-channel symmetric int8 weight.

    Attributes:
        weight: int8 ``[out_features, in_features]`` (a buffer: nothing trains it).
        scales: ``[out_features]`` in the compute dtype; ``weight * scales[:, None]`` is the
            dequantized weight.
        bias: The original bias, or None.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(out_features, device="meta"))
        self.bias = bias

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "Int8Linear":
        """An empty (meta) int8 layer in ``linear``'s place, keeping its bias parameter."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias)

    def set_weight(self, weight: torch.Tensor, *, device: torch.device, dtype: torch.dtype, consume: bool = False) -> None:
        """Quantize a full-precision ``[out, in]`` weight (any device) into this layer on ``device``.

        Args:
            consume: ``weight`` is a buffer nobody else holds (the loader's fresh read): work in it
                rather than in a copy.
        """
        # In place: one weight-sized fp32 buffer at most, so loading never holds much more than
        # the int8 share (freed temporaries can stay in the process's heap).
        w = weight.to(device=device, dtype=torch.float32)
        if w.data_ptr() == weight.data_ptr() and not consume:
            w = w.clone()
        scales = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)  # [out]
        self.weight = w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.scales = scales.to(dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in the compute dtype (for tests and references)."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]; the kernel wants a 2-D input in the scales' dtype
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def check_supported(mode: str | None, *, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantization this device and dtype cannot run, with the reason.

    Raises:
        DeviceError: for an unknown mode, or a device/dtype whose kernel fails a one-row probe.
    """
    if mode is None:
        return
    if mode not in MODES:
        raise DeviceError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    try:
        probe = torch.ones(1, 32, dtype=dtype, device=device)
        torch._weight_int8pack_mm(probe, torch.ones(8, 32, dtype=torch.int8, device=device),
                                  torch.ones(8, dtype=dtype, device=device))
    except (RuntimeError, NotImplementedError) as exc:
        raise DeviceError(f"--quantize {mode} cannot run on {device} in {str(dtype).removeprefix('torch.')} here "
                          f"(torch {torch.__version__}: {str(exc).splitlines()[0]}); use another dtype or device, "
                          "or no quantization") from None


def quantizable(model: nn.Module, name: str, *, layers_prefix: str) -> nn.Linear | None:
    """The ``nn.Linear`` whose weight is parameter ``name``, if it is in a decoder layer."""
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not module_name.startswith(layers_prefix):
        return None
    module = model.get_submodule(module_name)
    return module if type(module) is nn.Linear else None


def quantize_module(model: nn.Module, module_name: str, weight: torch.Tensor, *, device: torch.device,
                    dtype: torch.dtype, consume: bool = False) -> Int8Linear:
    """Put an ``Int8Linear`` holding ``weight`` quantized where ``module_name``'s ``nn.Linear`` was."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = Int8Linear.replacing(getattr(parent, child))
    layer.set_weight(weight, device=device, dtype=dtype, consume=consume)
    setattr(parent, child, layer)
    return layer
