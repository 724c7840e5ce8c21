"""How a message's tensors cross between a device and the host (Gloo sends CPU tensors only).

Every copy is blocking: non-blocking copies to and from MPS can corrupt data. On an accelerator
each copy waits for the device, and a decode step's message holds a few small tensors, so they
cross in one copy each way, into buffers kept per layout (``Inbox`` here, on the stages;
``rank0.outbox.Outbox`` on rank 0).
"""

from __future__ import annotations

import collections

import torch

_MIB = 1 << 20

def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of host memory (uint8) for copies to and from ``device``: page-locked for a CUDA
    device, where copies from pageable memory go through the driver's own staging at a fraction of
    the speed; plain elsewhere (MPS shares the host's memory, and a CPU copies nothing)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def grown(buffer: torch.Tensor | None, nbytes: int, allocate) -> torch.Tensor:
    """``buffer`` if it holds ``nbytes``, else a new one from ``allocate(size)``: at least twice the old,
    in whole MiB (a kept buffer for messages whose size varies, e.g. prefills of growing prompts). Made
    outside inference mode, as kept buffers are written later in whatever mode a step runs."""
    if buffer is not None and buffer.numel() >= nbytes:
        return buffer
    size = max(nbytes, 2 * buffer.numel() if buffer is not None else 0)
    with torch.inference_mode(False):
        return allocate(-(-size // _MIB) * _MIB)


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of device tensors, made with blocking copies (non-blocking MPS copies can corrupt data)."""
    return [t if t.device.type == "cpu" else t.to("cpu") for t in tensors]


def kept_buffers(layouts: collections.OrderedDict, key: tuple, make, *, keep: int):
    """The buffers kept for ``key``, made by ``make()`` on first use; the least recently used
    dropped past ``keep``. Kept buffers are written in place by later calls, in whatever mode
    those run: made as normal tensors (not inference tensors) and outside autograd, they can be."""
    kept = layouts.get(key)
    if kept is None:
        with torch.inference_mode(False), torch.no_grad():
            kept = layouts[key] = make()
        while len(layouts) > keep:
            layouts.popitem(last=False)
    else:
        layouts.move_to_end(key)
    return kept


class Inbox:
    """Where a stage's received tensors land on its device: small messages in one copy each, into
    device buffers kept per layout.

    A decode step's message holds a few small tensors (hidden state, positions, rotary cos/sin).
    Copying each to the device apart costs a blocking copy and a new tensor apiece, which on a GPU
    host is far more than the bytes (``bench/RESULTS.md``, "the hop"). Their bytes lie at fixed offsets in the received payload (see
    ``net.wire``), and every decode step of a lane has the same layout: such a message goes to the
    device in one blocking copy (non-blocking copies to MPS can corrupt data) into the buffer kept
    for its layout, whose views of each tensor were made once.

    Reusing the buffer is safe: the copy is ordered after the previous step's kernels on the
    device's one stream, and a stage keeps no reference to its inputs past a step (the layers
    compute new tensors; slots copy theirs in).

    On the CPU too: one copy into kept views costs less than making a view of each tensor in the
    payload, and the CPU then runs the very path an accelerator's stage runs.

    Args:
        device: The stage's device.
        keep: Layouts kept (least recently used dropped): lanes of several batch sizes.
        max_bytes: Larger messages (a prefill chunk) are copied tensor by tensor, into new memory.
    """

    def __init__(self, device: torch.device, *, keep: int = 8, max_bytes: int = 1 << 16) -> None:
        self.device, self.keep, self.max_bytes = device, keep, max_bytes
        self._layouts: collections.OrderedDict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = collections.OrderedDict()

    @torch.no_grad()
    def place(self, message) -> list[torch.Tensor]:
        """A received message's tensors on the device (``message``: a ``net.wire.Received``)."""
        data, layout = message.data, message.layout
        if data.nbytes > self.max_bytes or not layout or any(not nbytes for *_, nbytes in layout):
            return [t.to(self.device) for t in message.tensors]
        buffer, views = kept_buffers(self._layouts, layout, lambda: self._buffer(data.nbytes, layout), keep=self.keep)
        buffer.copy_(data)
        return list(views)

    def _buffer(self, nbytes: int, layout: tuple) -> tuple:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buffer, [buffer[off : off + size].view(dtype).view(shape) for dtype, shape, off, size in layout]
