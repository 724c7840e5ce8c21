"""Where rank 0's outgoing tensors come to the CPU (Gloo sends CPU tensors only), in one copy."""

from __future__ import annotations

import collections
import threading

import torch

from ..devices.copies import grown, host_buffer, kept_buffers, to_host

_ALIGN = 16  # every view in a buffer aligned for its dtype


class Outbox:
    """Where rank 0's outgoing tensors come to the CPU: a decode step's few small ones in one copy,
    a prefill's large ones into host memory kept per thread.

    The counterpart of ``devices.copies.Inbox``: each tensor copied out apart costs a blocking copy
    (a wait for the device) and a new CPU tensor. Here they are copied,
    queued on the device, into a device buffer kept per layout, which then comes over in one
    blocking copy (non-blocking copies from MPS can corrupt data) into a host buffer kept with it
    (page-locked on CUDA). Buffers are per thread: each lane or request thread sends its own, and
    the host views it returns are packed into the frame before that thread's next step.

    A larger message (a prefill's hidden state, 12 MB for 1430 tokens of an 8B model) is copied
    tensor by tensor into one host buffer kept per thread, grown to the largest message so far:
    page-locked on CUDA (a pageable copy runs at a fraction of the speed) and never fresh (fresh
    memory pays a page fault per 4 KiB at first touch).

    Args:
        device: Rank 0's device; on the CPU, tensors are sent from where they lie.
        keep: Layouts kept per thread (least recently used dropped).
        max_bytes: Larger messages (a prefill chunk) go through the per-thread buffer, tensor by tensor.
    """

    def __init__(self, device: torch.device, *, keep: int = 8, max_bytes: int = 1 << 16) -> None:
        self.device, self.keep, self.max_bytes = device, keep, max_bytes
        # Per thread, because the host views handed out stay in use until that thread's next send:
        # two threads sending at once (lanes, requests) must never write into one buffer. A step
        # object cannot hold them: they must outlive it, to be reused by the thread's next step.
        self._local = threading.local()

    @torch.no_grad()
    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the CPU; the returned views are valid until this thread's next call."""
        if self.device.type == "cpu" or not tensors:
            return to_host(tensors)
        if sum(t.nbytes for t in tensors) > self.max_bytes:
            return self._large(tensors)
        if any(not t.numel() or t.device.type != self.device.type for t in tensors):
            return to_host(tensors)
        layouts = getattr(self._local, "layouts", None)
        if layouts is None:
            layouts = self._local.layouts = collections.OrderedDict()
        key = tuple((t.dtype, t.shape) for t in tensors)
        on_device, device_views, host, host_views = kept_buffers(layouts, key, lambda: self._buffers(tensors), keep=self.keep)
        for view, t in zip(device_views, tensors):
            view.copy_(t)  # queued on the device, no wait
        host.copy_(on_device)  # the one wait
        return list(host_views)

    def _large(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each device tensor copied (blocking) into this thread's kept host buffer; CPU ones as they are."""
        need = sum(-(-t.nbytes // _ALIGN) * _ALIGN for t in tensors if t.device.type != "cpu" and t.numel())
        buffer = self._local.large = grown(getattr(self._local, "large", None), need, lambda nbytes: host_buffer(nbytes, self.device))
        out, offset = [], 0
        for t in tensors:
            if t.device.type == "cpu" or not t.numel():
                out.append(t.to("cpu"))
                continue
            view = buffer[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)  # blocking: non-blocking copies from MPS can corrupt data
            out.append(view)
            offset += -(-t.nbytes // _ALIGN) * _ALIGN
        return out

    def _buffers(self, tensors: list[torch.Tensor]) -> tuple:
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total = (total + t.nbytes + 15) // 16 * 16  # every view aligned for its dtype
        on_device = torch.empty(total, dtype=torch.uint8, device=self.device)
        host = host_buffer(total, self.device)

        def views(buffer):
            return [buffer[off : off + t.nbytes].view(t.dtype).view(t.shape) for off, t in zip(offsets, tensors)]

        return on_device, views(on_device), host, views(host)
