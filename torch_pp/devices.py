"""Device and dtype choice for a stage, and peak-memory readings.

Preference is mps > cuda > cpu. The wire always carries CPU tensors (Gloo cannot
send device tensors), so the transport stages through CPU buffers; this module
only decides where the math runs.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import os
import resource
import sys
import threading

import torch

from .dtypes import COMPUTE, to_torch
from .errors import DeviceError
from .options import Settings

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
    """The smallest prefill chunk worth sending on its own (pipelined prefill, see ``prefill``).

    Chunking pays when a chunk's compute dwarfs the fixed cost of one more message through the
    stages. On a CPU a 64-token chunk already computes for tens of milliseconds: 1.5x faster
    first tokens at 1024 tokens (2-vCPU VM). Accelerators compute such a chunk in a few
    milliseconds, less than its fixed cost: on 2x H200 (8B, bf16) 179-token chunks made a
    1430-token prompt's first token 2.9x later than unchunked, while 1024-token chunks were as
    fast as unchunked at 1430 tokens and 1.2x faster at 8192.
    """
    return 64 if device.type == "cpu" else 1024


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of device tensors, made with blocking copies (non-blocking MPS copies can corrupt data)."""
    return [t if t.device.type == "cpu" else t.to("cpu") for t in tensors]


def _normal_tensors():
    """Kept buffers are written in place by later calls, in whatever mode those run: made as
    normal tensors (not inference tensors) and outside autograd, they can be."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


class Inbox:
    """Where a stage's received tensors land on its device: small messages in one copy each, into
    device buffers kept per layout.

    A decode step's message holds a few small tensors (hidden state, positions, rotary cos/sin).
    Copying each to the device apart costs a blocking copy and a new tensor apiece, which on a GPU
    host is far more than the bytes (2x H200: ~190 us per decode step for five tensors, ~30 us
    in one copy to kept views). Their bytes lie at fixed offsets in the received payload (see
    ``net.wire``), and every decode step of a lane has the same layout: such a message goes to the
    device in one blocking copy (non-blocking copies to MPS can corrupt data) into the buffer kept
    for its layout, whose views of each tensor were made once.

    Reusing the buffer is safe: the copy is ordered after the previous step's kernels on the
    device's one stream, and a stage keeps no reference to its inputs past a step (the layers
    compute new tensors; slots copy theirs in).

    Args:
        device: The stage's device; on the CPU, tensors are used where they lie.
        keep: Layouts kept (least recently used dropped): lanes of several batch sizes.
        max_bytes: Larger messages (a prefill chunk) are copied tensor by tensor, into new memory.
    """

    def __init__(self, device: torch.device, *, keep: int = 8, max_bytes: int = 1 << 16) -> None:
        self.device, self.keep, self.max_bytes = device, keep, max_bytes
        self._layouts: collections.OrderedDict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = collections.OrderedDict()

    @torch.no_grad()
    def place(self, message) -> list[torch.Tensor]:
        """A received message's tensors on the device (``message``: a ``net.wire.Received``)."""
        if self.device.type == "cpu":
            return list(message.tensors)
        data, layout = message.data, message.layout
        if data.nbytes > self.max_bytes or not layout or any(not nbytes for *_, nbytes in layout):
            return [t.to(self.device) for t in message.tensors]
        kept = self._layouts.get(layout)
        if kept is None:
            with _normal_tensors():
                buffer = torch.empty(data.nbytes, dtype=torch.uint8, device=self.device)
                views = [buffer[off : off + nbytes].view(dtype).view(shape) for dtype, shape, off, nbytes in layout]
            kept = self._layouts[layout] = (buffer, views)
            while len(self._layouts) > self.keep:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(layout)
        kept[0].copy_(data)
        return list(kept[1])


class Outbox:
    """Where rank 0's outgoing tensors come to the CPU: a decode step's few small ones in one copy.

    The counterpart of ``Inbox``: each tensor copied out apart costs a blocking copy (a wait for
    the device) and a new CPU tensor (2x H200: 105-120 us per step for five). Here they are copied,
    queued on the device, into a device buffer kept per layout, which then comes over in one
    blocking copy (non-blocking copies from MPS can corrupt data) into a host buffer kept with it
    (page-locked on CUDA). Buffers are per thread: each lane or request thread sends its own, and
    the host views it returns are packed into the frame before that thread's next step.

    Args:
        device: Rank 0's device; on the CPU, tensors are sent from where they lie.
        keep: Layouts kept per thread (least recently used dropped).
        max_bytes: Larger messages (a prefill chunk) are copied tensor by tensor.
    """

    def __init__(self, device: torch.device, *, keep: int = 8, max_bytes: int = 1 << 16) -> None:
        self.device, self.keep, self.max_bytes = device, keep, max_bytes
        self._local = threading.local()

    @torch.no_grad()
    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the CPU; the returned views are valid until this thread's next call."""
        if (self.device.type == "cpu" or not tensors or sum(t.nbytes for t in tensors) > self.max_bytes
                or any(not t.numel() or t.device.type != self.device.type for t in tensors)):
            return to_host(tensors)
        layouts = getattr(self._local, "layouts", None)
        if layouts is None:
            layouts = self._local.layouts = collections.OrderedDict()
        key = tuple((t.dtype, t.shape) for t in tensors)
        kept = layouts.get(key)
        if kept is None:
            with _normal_tensors():
                kept = layouts[key] = self._buffers(tensors)
            while len(layouts) > self.keep:
                layouts.popitem(last=False)
        else:
            layouts.move_to_end(key)
        on_device, device_views, host, host_views = kept
        for view, t in zip(device_views, tensors):
            view.copy_(t)  # queued on the device, no wait
        host.copy_(on_device)  # the one wait
        return list(host_views)

    def _buffers(self, tensors: list[torch.Tensor]) -> tuple:
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total = (total + t.nbytes + 15) // 16 * 16  # every view aligned for its dtype
        on_device = torch.empty(total, dtype=torch.uint8, device=self.device)
        host = torch.empty(total, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

        def views(buffer):
            return [buffer[off : off + t.nbytes].view(t.dtype).view(t.shape) for off, t in zip(offsets, tensors)]

        return on_device, views(on_device), host, views(host)


def stamp(device: torch.device) -> float:
    """A timestamp (``trace.now``) taken after the device's queued work: on CUDA and MPS kernels run
    asynchronously, and an unsynchronised stamp books a stage's compute as its send or wait."""
    from .trace import now

    synchronize(device)
    return now()


class DeviceTurn:
    """One thread at a time does device work in this process, a thread giving its turn up while it waits.

    MPS work from two Python threads can abort the process in Metal (pytorch#197805). Rank 0's
    threads (lanes, a server's requests) hold the turn while they compute and release it while
    they wait for the other stages; on every device alike, so CPU and CUDA runs take the path
    MPS takes. Re-entrant per thread (generate() calls forward()). First come, first served,
    and a ``generate()`` call passes its turn on after each token (``pass_on``): with nothing to
    wait for in between (one stage), a request would otherwise hold the device until it ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Threads waiting, in arrival order, each on its own condition: a release wakes only the
        # next one (a server's many waiting requests would all wake, and take the GIL, at every token).
        self._queue: collections.deque[threading.Condition] = collections.deque()
        self._held = False
        self._local = threading.local()

    def _acquire(self) -> None:
        with self._lock:
            if not self._held and not self._queue:
                self._held = True
                return
            me = threading.Condition(self._lock)
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    me.wait()
            except BaseException:  # an interrupt while waiting: leave the queue, or it would stall
                first = self._queue[0] is me
                self._queue.remove(me)
                if first and not self._held and self._queue:
                    self._queue[0].notify()
                raise
            self._queue.popleft()
            self._held = True

    def _release(self) -> None:
        with self._lock:
            self._held = False
            if self._queue:
                self._queue[0].notify()

    @contextlib.contextmanager
    def held(self):
        """Hold the turn for this block (nested blocks in one thread share it)."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._acquire()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._release()

    @contextlib.contextmanager
    def given_up(self):
        """Release the turn, if this thread holds it, for a block that does no device work (a wait)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = 0
            self._release()
        try:
            yield
        finally:
            if depth:
                self._acquire()
                self._local.depth = depth

    def pass_on(self) -> None:
        """Between two steps: if other threads wait for the turn, let them have it first."""
        if getattr(self._local, "depth", 0) and self._queue:
            with self.given_up():
                pass
