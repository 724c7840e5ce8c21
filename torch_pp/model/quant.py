"""Weight-only int8 and int4 quantization of a stage's linear layers, done tensor by tensor while it loads.

Both layers multiply with PyTorch's own weight-only kernels, so activations stay floating point
and nothing is downloaded: ``torch._weight_int8pack_mm`` (per-output-channel int8; CPU, CUDA,
MPS) and the int4 packed kernels (asymmetric, one scale and zero per group of input channels;
``torch._weight_int4pack_mm_for_cpu`` on the CPU, ``torch._weight_int4pack_mm`` on CUDA and
MPS, each with its own packed layout, made by its own ``_convert_weight_to_int4pack*``).
torchao wraps the same kernels but is not installed with torch and its CPU int4 layout needs
a newer CPU build; a small module of our own covers all three devices.

Where a kernel is slow, an accelerator multiplies by the weight dequantized on the fly instead
(see ``dense_rows``): CUDA's int8 kernel ran decode slower than unquantized and prefills far
slower, and its int4 kernel is tuned for a few rows (``bench/RESULTS.md``, "quantization"). The
int4 weight stays in the kernel's packed layout;
its dequantization reads that layout through a permutation learnt from the packer itself.

The loader replaces a decoder layer's ``nn.Linear`` the moment its weight is read, so a stage
never holds its full-precision share. Embeddings, the LM head and fused MoE expert tensors (not
``nn.Linear``) stay in the compute dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeviceError
from ..options import INT4_GROUP, QUANTIZE_MODES as MODES


def kernel_dtype(device: torch.device, dtype: torch.dtype, mode: str) -> torch.dtype:
    """The activation dtype the weight-only kernel runs in for a model computing in ``dtype``.

    PyTorch's CPU weight-only kernels have a fast path for bfloat16 activations only: with
    float32 ones they ran many times slower than a dense float32 matmul, while bfloat16 ones beat
    it (``bench/RESULTS.md``, "quantization"). So a float32 model's quantized layers compute in
    bfloat16. CUDA's int4 kernel takes bfloat16 only.
    """
    if dtype == torch.float32 and device.type == "cpu":
        return torch.bfloat16
    if mode == "int4" and device.type == "cuda":
        return torch.bfloat16
    return dtype


KERNEL_ROWS = 192  # more input rows than this (a prefill) and an accelerator may use the dense path


def dense_rows(device: torch.device, mode: str) -> int | None:
    """From how many input rows a layer multiplies by its dequantized weight (None: never).

    CPU: never (its kernels are fast at any size in bfloat16). CUDA int8: always (its kernel is
    slow even for one row). CUDA int4 and MPS: above ``KERNEL_ROWS``, where a kernel written for
    decode's few rows falls behind a dense matmul.
    """
    if device.type == "cpu":
        return None
    if device.type == "cuda" and mode == "int8":
        return 0
    return KERNEL_ROWS


class QuantLinear(nn.Module):
    """What the int8 and int4 layers share: shape, bias, the kernel's dtype, the dense reference."""

    mode = ""

    def __init__(self, in_features: int, out_features: int, *, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias
        self.kernel_dtype = torch.float32

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "QuantLinear":
        """An empty (meta) quantized layer in ``linear``'s place, keeping its bias parameter."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias)

    @staticmethod
    def _fp32(weight: torch.Tensor, device: torch.device, consume: bool) -> torch.Tensor:
        # Worked on in place: one weight-sized fp32 buffer at most, so loading never holds much
        # more than the quantized share (freed temporaries can stay in the process's heap).
        w = weight.to(device=device, dtype=torch.float32)
        return w.clone() if w.data_ptr() == weight.data_ptr() and not consume else w

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel: [rows, in] -> [rows, out], in the kernel dtype."""
        raise NotImplementedError

    def _dense(self) -> torch.Tensor | None:
        """The dequantized ``[out, in]`` weight in the kernel dtype, or None where this layer
        cannot read its own layout (then the kernel serves every size)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]; the kernels want a 2-D input in the kernel dtype
        x2d = x.reshape(-1, self.in_features).to(self.kernel_dtype)
        dense = None
        rows = dense_rows(x.device, self.mode)
        if rows is not None and x2d.shape[0] > rows:
            dense = self._dense()
        out = F.linear(x2d, dense) if dense is not None else self._matmul(x2d)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def dequantized(self) -> torch.Tensor:
        """The ``[out, in]`` weight this layer multiplies by, in float32 (for tests and references):
        the kernel itself applied to the identity, so it shows what the packed layout holds."""
        eye = torch.eye(self.in_features, dtype=self.kernel_dtype, device=self.weight.device)
        return self._matmul(eye).float().T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.mode}"


class Int8Linear(QuantLinear):
    """A linear layer with a per-output-channel symmetric int8 weight.

    Attributes:
        weight: int8 ``[out_features, in_features]`` (a buffer: nothing trains it).
        scales: ``[out_features]`` in the kernel dtype; ``weight * scales[:, None]`` is the weight.
        bias: The original bias, or None.
    """

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, *, bias: nn.Parameter | None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(out_features, device="meta"))

    def set_weight(self, weight: torch.Tensor, *, device: torch.device, dtype: torch.dtype, consume: bool = False) -> None:
        """Quantize a full-precision ``[out, in]`` weight (any device) into this layer on ``device``.

        Args:
            dtype: The model's compute dtype (the kernel's may differ, see ``kernel_dtype``).
            consume: ``weight`` is a buffer nobody else holds (the loader's fresh read): work in it
                rather than in a copy.
        """
        w = self._fp32(weight, device, consume)
        self.kernel_dtype = kernel_dtype(device, dtype, self.mode)
        scales = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-12).div_(127.0)  # [out]
        self.weight = w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.scales = scales.to(self.kernel_dtype)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2d, self.weight, self.scales)

    def _dense(self) -> torch.Tensor:
        return self.weight.to(self.kernel_dtype).mul_(self.scales[:, None])


class Int4Linear(QuantLinear):
    """A linear layer with an asymmetric int4 weight: one scale and zero per ``group_size`` inputs.

    ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (the convention of PyTorch's int4 kernels).

    Attributes:
        weight: The packed int4 weight, in the layout of this device's kernel.
        scales_and_zeros: ``[in / group_size, out, 2]`` in the kernel dtype.
        group_size: Input channels sharing one scale and zero.
    """

    mode = "int4"

    def __init__(self, in_features: int, out_features: int, *, bias: nn.Parameter | None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.group_size = int4_group(in_features, out_features)
        if self.group_size is None:
            raise DeviceError(f"an int4 layer needs inputs divisible by {INT4_GROUP} and outputs by 8, "
                              f"got {in_features} -> {out_features}")
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device="meta"))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, out_features, 2, device="meta"))

    def set_weight(self, weight: torch.Tensor, *, device: torch.device, dtype: torch.dtype, consume: bool = False) -> None:
        """Quantize a full-precision ``[out, in]`` weight into this layer on ``device`` (see ``Int8Linear``)."""
        w = self._fp32(weight, device, consume)
        self.kernel_dtype = kernel_dtype(device, dtype, self.mode)
        n, k, g = self.out_features, self.in_features, self.group_size
        groups = w.view(n, k // g, g)
        low = groups.amin(dim=-1, keepdim=True)
        scales = (groups.amax(dim=-1, keepdim=True) - low).clamp_(min=1e-6).div_(15.0)
        q = groups.sub_(low).div_(scales).round_().clamp_(0, 15).view(n, k)  # in place in w
        zeros = low.add_(scales, alpha=8.0)  # (q - 8) * scale + zero recovers the weight
        self.scales_and_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(self.kernel_dtype)
        if device.type == "cpu":
            self.weight = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        else:  # CUDA and MPS take two 4-bit values per byte, the even input channel in the high half
            q = q.to(torch.uint8)
            self.weight = torch._convert_weight_to_int4pack((q[:, ::2] << 4) | q[:, 1::2], _inner_k_tiles(k))

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x2d, self.weight, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm(x2d, self.weight, self.group_size, self.scales_and_zeros)

    def _dense(self) -> torch.Tensor | None:
        """Unpack CUDA's tiled layout: ``[out/8, in/(16 t), 32, t/2]`` int32 of 8 nibbles each, every
        tile of 8 outputs x 16 t inputs stored in one fixed order (``_tile_gather``)."""
        w = self.weight
        if w.device.type != "cuda" or w.dim() != 4:
            return None
        n, k, g = self.out_features, self.in_features, self.group_size
        inner = 2 * w.shape[3]
        gather = _tile_gather(w.device, inner)
        if gather is None:
            return None
        cols = 16 * inner
        out = torch.empty(n, k, dtype=self.kernel_dtype, device=w.device)
        scales, zeros = (t.T for t in self.scales_and_zeros.unbind(-1))  # [out, in/g] each
        step = max(1, 2**25 // (8 * k))  # output tiles per slice: temporaries of ~32M elements at most
        for t0 in range(0, n // 8, step):
            part = w[t0:t0 + step].contiguous().view(torch.uint8)  # little-endian: byte j = nibbles 2j, 2j+1
            tiles = part.shape[0]
            nib = torch.stack([part & 15, part >> 4], dim=-1).view(tiles, part.shape[1], -1)
            q = nib.index_select(-1, gather).view(tiles, part.shape[1], 8, cols).permute(0, 2, 1, 3)
            q = q.reshape(8 * tiles, k // g, g).to(self.kernel_dtype).sub_(8)
            rows = slice(8 * t0, 8 * (t0 + tiles))
            torch.addcmul(zeros[rows, :, None], q, scales[rows, :, None], out=out[rows].view(-1, k // g, g))
        return out


_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # the nibbles of an int32, lowest first


@functools.cache
def _tile_gather(device: torch.device, inner_k_tiles: int) -> torch.Tensor | None:
    """For each weight of a tile (8 outputs x 16 t inputs, output-major), the nibble slot where
    CUDA's int4 packer stores it: learnt from the packer itself.

    One tile is packed three times, each time with one base-16 digit of every position's index
    as its value; reading the packed nibbles back spells, slot by slot, the index of the weight
    stored there. None if that is not a permutation (another layout).
    """
    cols = 16 * inner_k_tiles
    index = torch.arange(8 * cols, dtype=torch.int32).view(8, cols)
    code = torch.zeros(8 * cols, dtype=torch.int64, device=device)
    for digit in range(3):  # 16**3 >= 8 * 16 * 8 positions
        q = ((index >> (4 * digit)) & 15).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(device), inner_k_tiles)
        nib = (packed.reshape(-1, 1) >> _SHIFTS.to(device)) & 15
        code += nib.reshape(-1).to(torch.int64) << (4 * digit)
    slots = torch.arange(8 * cols, device=device)
    if code.numel() != 8 * cols or not torch.equal(code.sort().values, slots):
        return None
    gather = torch.empty_like(code)
    gather[code] = slots
    return gather


def int4_group(in_features: int, out_features: int) -> int | None:
    """The int4 group size for a layer of this shape, or None if the kernels cannot take it."""
    return INT4_GROUP if in_features % INT4_GROUP == 0 and out_features % 8 == 0 else None


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}
TOLERANCE = {"int8": 0.05, "int4": 0.25}  # relative error of the probe's product; a wrong layout gives ~1


def check_supported(mode: str | None, *, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantization this device and dtype cannot run, with the reason.

    A small layer is quantized and multiplied on ``device``; its product must match the dense
    one within the mode's error, so a kernel that runs but reads another layout is refused too.

    Raises:
        DeviceError: for an unknown mode, or a device/dtype whose kernel fails the probe.
    """
    if mode is None:
        return
    if mode not in MODES:
        raise DeviceError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 128, generator=gen)
    x = torch.randn(4, 128, generator=gen)
    try:
        layer = LAYERS[mode](128, 64, bias=None)
        layer.set_weight(dense, device=device, dtype=dtype)
        got = layer(x.to(device=device, dtype=dtype)).float().cpu()
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is a refusal, with its reason
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    else:
        want = x @ dense.T
        error = float((got - want).norm() / want.norm())
        if error <= TOLERANCE[mode]:
            return
        reason = f"its kernel's product is off by {error:.0%} of a dense one"
    raise DeviceError(f"--quantize {mode} cannot run on {device} in {str(dtype).removeprefix('torch.')} here "
                      f"(torch {torch.__version__}: {reason}); use another dtype or device, or no quantization")


def quantizable(model: nn.Module, name: str, *, layers_prefix: str, mode: str = "int8") -> nn.Linear | None:
    """The ``nn.Linear`` whose weight is parameter ``name``, if it is in a decoder layer and ``mode``
    can take its shape (an int4 layer whose shape the kernels refuse stays in the compute dtype)."""
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight" or not module_name.startswith(layers_prefix):
        return None
    module = model.get_submodule(module_name)
    if type(module) is not nn.Linear:
        return None
    if mode == "int4" and int4_group(module.in_features, module.out_features) is None:
        return None
    return module


def quantize_module(model: nn.Module, module_name: str, weight: torch.Tensor, *, device: torch.device,
                    dtype: torch.dtype, mode: str = "int8", consume: bool = False) -> QuantLinear:
    """Put a quantized layer holding ``weight`` where ``module_name``'s ``nn.Linear`` was."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = LAYERS[mode].replacing(getattr(parent, child))
    layer.set_weight(weight, device=device, dtype=dtype, consume=consume)
    setattr(parent, child, layer)
    return layer


def quantized_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every quantized layer's weight buffers (what ``weight_bytes`` counts beside the parameters)."""
    return [t for m in model.modules() if isinstance(m, QuantLinear) for _, t in m.named_buffers(recurse=False)]
