"""Device and dtype choice for a stage, and peak-memory readings: the device rules live in this package.

Preference is mps > cuda > cpu. The wire always carries CPU tensors (Gloo cannot
send device tensors), so the transport stages through CPU buffers: ``copies`` says how
a message's tensors cross to and from a device, ``turn`` how rank 0's threads share one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys

import torch

from ..dtypes import COMPUTE, to_torch
from ..errors import DeviceError
from ..options import Settings

DTYPES = {name: to_torch(name) for name in COMPUTE}


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
        requested = Settings.from_env().device
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
    """Names of the floating dtypes that work on ``device`` (never float64: MPS lacks it)."""
    if device.type == "cuda":
        names = ["float32", "float16"]
        if torch.cuda.is_bf16_supported():
            names.append("bfloat16")
        return names
    if device.type == "mps":
        names = ["float32", "float16"]
        if torch.backends.mps.is_macos_or_newer(14, 0):  # bf16 on MPS needs macOS 14+
            names.append("bfloat16")
        return names
    return ["float32", "float16", "bfloat16"]


def default_dtype(device_type: str, checkpoint: str | None, supported: list[str]) -> str:
    """The compute dtype when none is asked for.

    CPU: float32 (fast and exact there). An accelerator: the checkpoint's own 16-bit dtype where
    the device has it; a float32 (or unknown) checkpoint runs in bfloat16 where available. float16
    is never chosen for a checkpoint that is not float16: bf16-trained weights overflow in fp16
    (Qwen2 prints "!!!!", DeepSeek gives NaN); MPS then falls back to float32, CUDA to float16 only
    when the card has no bf16 at all (pre-Ampere, where fp16 is what such cards run).
    """
    if device_type == "cpu":
        return "float32"
    if checkpoint in ("bfloat16", "float16") and checkpoint in supported:
        return checkpoint
    if "bfloat16" in supported:
        return "bfloat16"
    if checkpoint == "float16" or device_type == "cuda":
        return "float16"
    return "float32"


def pick_dtype(requested: str | None, device: torch.device, checkpoint: str | None = None) -> torch.dtype:
    """Return the compute dtype: the request if the device supports it, else ``default_dtype``.

    Args:
        requested: A dtype name, or None/"auto" for the default.
        device: Where the stage computes.
        checkpoint: The checkpoint's own dtype name (config ``dtype``/``torch_dtype``), if known.

    Raises:
        DeviceError: for a dtype the device cannot run (float64 is never offered: MPS lacks it).
    """
    allowed = supported_dtypes(device)
    if requested in (None, "", "auto"):
        return DTYPES[default_dtype(device.type, checkpoint, allowed)]
    if requested not in DTYPES:
        raise DeviceError(f"unsupported dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    if requested not in allowed:
        raise DeviceError(f"dtype {requested} is not supported on {device} here; supported: {', '.join(allowed)}")
    return DTYPES[requested]


def checkpoint_dtype(config) -> str | None:
    """The dtype a model's config says its weights are stored in, as a name (or None)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return dtype_name(value) if isinstance(value, torch.dtype) else (value if isinstance(value, str) else None)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def return_freed_memory() -> None:
    """Give the process's freed heap pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Loading that frees a large temporary per tensor (quantizing) otherwise leaves holes that the
    next, differently sized allocation cannot reuse, and resident memory creeps above the share.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if sys.platform != "linux":
        return None  # macOS returns large freed blocks by itself
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: device allocations on CUDA; on a Mac, the lifetime peak physical
    footprint (unified memory: it counts Metal buffers too); else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if sys.platform == "darwin":
        footprint = _darwin_peak_footprint()
        if footprint:
            return footprint
    return peak_rss_bytes()


def _darwin_peak_footprint() -> int | None:
    """``ri_lifetime_max_phys_footprint`` from libproc's ``proc_pid_rusage`` (RUSAGE_INFO_V4)."""

    class RusageInfoV4(ctypes.Structure):  # <sys/resource.h>, struct rusage_info_v4
        _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [(name, ctypes.c_uint64) for name in (
            "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins", "ri_wired_size",
            "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime", "ri_proc_exit_abstime",
            "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups", "ri_child_interrupt_wkups",
            "ri_child_pageins", "ri_child_elapsed_abstime", "ri_diskio_bytesread", "ri_diskio_byteswritten",
            "ri_cpu_time_qos_default", "ri_cpu_time_qos_maintenance", "ri_cpu_time_qos_background",
            "ri_cpu_time_qos_utility", "ri_cpu_time_qos_legacy", "ri_cpu_time_qos_user_initiated",
            "ri_cpu_time_qos_user_interactive", "ri_billed_system_time", "ri_serviced_system_time",
            "ri_logical_writes", "ri_lifetime_max_phys_footprint", "ri_instructions", "ri_cycles",
            "ri_billed_energy", "ri_serviced_energy", "ri_interval_max_phys_footprint", "ri_runnable_time")]

    try:
        libproc = ctypes.CDLL(ctypes.util.find_library("proc") or "/usr/lib/libproc.dylib")
        info = RusageInfoV4()
        if libproc.proc_pid_rusage(os.getpid(), 4, ctypes.byref(info)) != 0:  # 4: RUSAGE_INFO_V4
            return None
        return int(info.ri_lifetime_max_phys_footprint)
    except (OSError, AttributeError):
        return None


def memory_available(device: torch.device) -> int:
    """Bytes this process could use: free CUDA memory; on MPS what is actually free of the GPU's
    working set (unified memory: also bounded by free RAM); else available RAM."""
    import psutil

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        free_of_working_set = int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory())
        return max(0, min(free_of_working_set, int(psutil.virtual_memory().available)))
    return int(psutil.virtual_memory().available)


def cap_memory(device: torch.device, budget: int) -> None:
    """Hold this process to its planned share on MPS, where the allocator would otherwise let it run
    to 1.7x the working set, swapping meanwhile, before failing (several ranks on one Mac share it)."""
    if device.type == "mps" and budget > 0:
        fraction = min(1.0, budget / max(1, int(torch.mps.recommended_max_memory())))
        torch.mps.set_per_process_memory_fraction(fraction)


def choose_attention_kernels(device: torch.device) -> None:
    """CUDA only: scaled-dot-product attention without cuDNN's kernel (flash, memory-efficient or
    math instead), for the whole process.

    Why: cuDNN builds a plan for each new attention shape, and a served model's shapes are almost
    always new (every prompt length, every KV length of a decode step, every batch size a running
    batch passes through). Measured on one H200 (torch 2.11, cuDNN 9.19, bf16, 32 query / 8 KV
    heads of 64, one query position): a batch of 8 at a KV length seen before took 62 us without
    a mask and 119 us with one; at a new length 55-70 ms, the plan. Without cuDNN the same calls
    took 68 and 165 us whatever the length. Benchmarks that warm every length hide this; a server
    never sees its lengths in advance. CPU and MPS are untouched.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def fuses(device: torch.device) -> bool:
    """Whether captured decode steps on ``device`` fuse their norms and MLPs (``model.fusion``):
    CUDA only, where inductor has triton, unless ``TORCH_PP_FUSE=0``. CPU and MPS steps are not
    captured as graphs, and their eager kernels cost what a fused one would there."""
    if device.type != "cuda" or not Settings.from_env().fuse:
        return False
    from torch.utils._triton import has_triton  # torch's own probe; imports triton, so only on CUDA

    return has_triton()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so timings and CPU copies see finished results."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def max_buffer_bytes(device: torch.device) -> int | None:
    """The largest single buffer the device can hold: Metal's ``maxBufferLength`` on MPS, else None.

    A fused MoE expert tensor (all experts of a layer in one tensor) can exceed it on a Mac with
    plenty of memory; torch has no call for it, so Metal is asked through the Objective-C runtime.
    """
    if device.type != "mps":
        return None

    try:
        metal = ctypes.CDLL("/System/Library/Frameworks/Metal.framework/Metal")
        objc = ctypes.CDLL(ctypes.util.find_library("objc"))
        metal.MTLCreateSystemDefaultDevice.restype = ctypes.c_void_p
        objc.sel_registerName.restype = ctypes.c_void_p
        objc.sel_registerName.argtypes = [ctypes.c_char_p]
        send = objc.objc_msgSend
        send.restype, send.argtypes = ctypes.c_uint64, [ctypes.c_void_p, ctypes.c_void_p]
        handle = metal.MTLCreateSystemDefaultDevice()
        return int(send(handle, objc.sel_registerName(b"maxBufferLength"))) if handle else None
    except (OSError, AttributeError):
        return None


def min_prefill_chunk(device: torch.device) -> int:
    """The smallest prefill chunk worth sending on its own (pipelined prefill, see ``rank0.forward``).

    Chunking pays when a chunk's compute dwarfs the fixed cost of one more message through the
    stages. On a CPU a 64-token chunk already computes for tens of milliseconds; accelerators
    compute such a chunk in a few milliseconds, less than its fixed cost, and only chunks of
    about 1024 tokens pay there (``bench/RESULTS.md``, "prefill").
    """
    return 64 if device.type == "cpu" else 1024


def stamp(device: torch.device) -> float:
    """A timestamp (``trace.now``) taken after the device's queued work: on CUDA and MPS kernels run
    asynchronously, and an unsynchronised stamp books a stage's compute as its send or wait."""
    from ..trace import now

    synchronize(device)
    return now()
