"""Device and dtype choice for a stage, and peak-memory readings.

Preference is mps > cuda > cpu. The wire always carries CPU tensors (Gloo cannot
send device tensors), so the transport stages through CPU buffers; this module
only decides where the math runs.
"""

from __future__ import annotations

import os
import platform
import resource
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or dtype this machine cannot use."""


def pick_device(requested: str | None = None, *, local_rank: int = 0) -> torch.device:
    """Return the device a stage runs on.

    Args:
        requested: ``"mps"``, ``"cuda"``, ``"cuda:1"``, ``"cpu"``, or None for ``$TORCH_PP_DEVICE``
            if set, else the best available.
        local_rank: This process's rank on its machine; picks the CUDA card when several exist.

    Raises:
        DeviceError: if the requested device is not available here.
    """
    if requested in (None, "", "auto"):
        requested = os.environ.get("TORCH_PP_DEVICE") or None
    if requested in (None, "", "auto"):
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps was asked for, but MPS is not available on this machine (needs Apple silicon and a torch build with MPS)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but no CUDA device is available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {requested!r}; use cpu, cuda or mps")
    return device


def supported_dtypes(device: torch.device) -> list[str]:
    """Names of the floating dtypes that work on ``device``."""
    if device.type == "cuda":
        names = ["float32", "float16"]
        if torch.cuda.is_bf16_supported():
            names.append("bfloat16")
        return names
    if device.type == "mps":
        names = ["float32", "float16"]
        if _macos_major() >= 14:  # bf16 on MPS needs macOS 14+
            names.append("bfloat16")
        return names
    return ["float32", "float16", "bfloat16"]


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """Return the compute dtype: the request if the device supports it, else a sensible default.

    Defaults: float32 on CPU (fast and exact there), bfloat16 on CUDA when supported,
    float16 on MPS.

    Raises:
        DeviceError: for a dtype the device cannot run (float64 is never offered: MPS lacks it).
    """
    allowed = supported_dtypes(device)
    if requested in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if "bfloat16" in allowed else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise DeviceError(f"unsupported dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    if requested not in allowed:
        raise DeviceError(f"dtype {requested} is not supported on {device} here; supported: {', '.join(allowed)}")
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: device allocations on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    rss = rss if sys.platform == "darwin" else rss * 1024
    if device.type == "mps":
        return max(rss, int(torch.mps.driver_allocated_memory()))
    return int(rss)


def memory_available(device: torch.device) -> int:
    """Bytes this process could use: free CUDA memory, MPS's recommended working set, or available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    import psutil

    return int(psutil.virtual_memory().available)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so timings and CPU copies see finished results."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _macos_major() -> int:
    version = platform.mac_ver()[0]
    return int(version.split(".")[0]) if version else 0
