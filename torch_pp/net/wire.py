"""Framing of pipeline messages: a fixed-size frame, then exactly the payload it announces.

A message is an operation code, a small JSON-able ``meta`` dict and a list of
tensors. Its payload is a table of int64 words describing each tensor (dtype,
shape, offset, byte count), the JSON meta, then every tensor's bytes at 16-byte
aligned offsets.

On the wire every message starts with one frame of ``frame_bytes`` bytes (the
same on every rank): a header of ``HEADER_WORDS`` int64 words (magic, protocol
version, op, table words, meta byte count, payload byte count, sequence number,
sender rank, inline flag, a spare), then, when it fits, the payload itself. A
decode step's message fits, so it costs one Gloo send; a larger payload (a long
prompt's prefill) follows as a second send of exactly the announced size. One
send matters: on loopback, two back-to-back small sends take about three times
as long as one.

The tensor table is binary, not JSON, because a decode step packs and unpacks a
message right after its stage's layers have evicted every cache, when each
Python object touched costs a memory read (``bench/RESULTS.md``, "the hop": most of
what is left is the JSON meta).

The receiver never guesses a size. This module is pure: no torch.distributed.
"""

from __future__ import annotations

import ctypes
import enum
import json
import struct
from dataclasses import dataclass, field

import torch
from ..dtypes import WIRE, to_torch
from ..errors import WireError
from ..options import DEFAULT_FRAME_BYTES

MAGIC = 0x74707070  # "tppp"
PROTOCOL = 4
HEADER_WORDS = 10  # 80 bytes: the payload, and so every tensor in it, stays 16-byte aligned
HEADER_BYTES = HEADER_WORDS * 8
_HEADER = struct.Struct(f"<{HEADER_WORDS}q")
_ALIGN = 16

_DTYPES = tuple(to_torch(name) for name in WIRE)  # a dtype's code on the wire is its index here
_CODES = {dt: code for code, dt in enumerate(_DTYPES)}
_META = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with options makes one per call


class Op(enum.IntEnum):
    """What a message asks of its receiver."""

    FORWARD = 1   # run your layers on these activations, pass the result on
    RESULT = 2    # final hidden state, last stage -> rank 0
    SHUTDOWN = 3  # end the pipeline session; forwarded round the ring
    ERROR = 4     # a stage failed; meta["error"] says how; forwarded to rank 0
    STATS = 5     # each stage appends its figures to meta["stages"]
    PING = 6      # doctor's link measurements: echo or acknowledge
    FREE = 7      # drop lanes' KV caches (meta["lanes"]); forwarded round the ring, no answer
    ROWS = 8      # a lane's cache becomes other lanes' rows (meta["lane"], meta["parts"]: see model.rows); no answer


@dataclass
class Message:
    """One framed message.

    Attributes:
        op: The operation.
        meta: JSON-serialisable metadata.
        tensors: Tensors carried in the payload; any device, any of the supported dtypes.
    """

    op: Op
    meta: dict = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


class Received(Message):
    """A received message. Its tensors are CPU views into the payload, made on first use: a stage
    that only copies them to its device never needs them (see ``devices.copies.Inbox``).

    Attributes:
        data: The payload's tensor bytes (CPU, uint8).
        layout: Each tensor's ``(dtype, shape, offset into data, bytes)``.
    """

    def __init__(self, op: Op, meta: dict, data: torch.Tensor, layout: tuple) -> None:
        self._tensors = None
        super().__init__(op=op, meta=meta, tensors=None)
        self.data, self.layout = data, layout

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            buffer = self.data.numpy()  # one view for all the tensors; each keeps the buffer alive
            self._tensors = [torch.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=off).view(shape)
                             if nbytes else torch.empty(shape, dtype=dtype) for dtype, shape, off, nbytes in self.layout]
        return self._tensors

    @tensors.setter
    def tensors(self, value: list[torch.Tensor] | None) -> None:
        self._tensors = value


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pack(message: Message, *, seq: int = 0, sender: int = 0, frame_bytes: int = DEFAULT_FRAME_BYTES,
         out: torch.Tensor | None = None, rest_out=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Serialise a message into ``(frame, rest)``: contiguous CPU uint8 tensors.

    ``frame`` always has ``frame_bytes`` bytes; ``rest`` is None when the payload fits in the frame.
    ``out``, if given, is a reusable ``frame_bytes`` staging buffer to fill instead of a new one
    (safe once the previous send from it has completed). ``rest_out``, if given, returns a reusable
    buffer of at least the bytes asked for, for a payload that does not fit in the frame.
    """
    words, placed, offset = [], [], 0
    for t in message.tensors:
        code = _CODES.get(t.dtype)
        if code is None:
            raise WireError(f"cannot send a tensor of dtype {t.dtype}")
        shape, nbytes = t.shape, t.nbytes
        words += (code, len(shape), *shape, offset, nbytes)
        placed.append((t, offset, nbytes))
        offset = _aligned(offset + nbytes)
    table = struct.pack(f"<{len(words)}q", *words)
    meta_bytes = _META.encode(message.meta).encode() if message.meta else b""
    data_start = _aligned(len(table) + len(meta_bytes))
    total = data_start + offset
    inline = total <= frame_bytes - HEADER_BYTES
    frame = out if out is not None else torch.empty(frame_bytes, dtype=torch.uint8)
    if inline:
        payload = frame[HEADER_BYTES : HEADER_BYTES + total]
    else:
        payload = rest_out(total)[:total] if rest_out is not None else torch.empty(total, dtype=torch.uint8)
    # Plain memory copies where possible: a decode step runs right after a long idle wait,
    # when every extra Python/torch call is at its slowest.
    base = payload.data_ptr()
    ctypes.memmove(base, table + meta_bytes, len(table) + len(meta_bytes))
    for t, off, nbytes in placed:
        if not nbytes:
            continue
        if t.device.type == "cpu" and t.is_contiguous():
            ctypes.memmove(base + data_start + off, t.data_ptr(), nbytes)
        else:
            # One blocking copy straight into the payload (from any device, any strides):
            # non_blocking device->CPU copies (MPS above all) can land late or corrupt.
            payload[data_start + off : data_start + off + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
    header = _HEADER.pack(MAGIC, PROTOCOL, int(message.op), len(words), len(meta_bytes), total, seq, sender, int(inline), 0)
    ctypes.memmove(frame.data_ptr(), header, HEADER_BYTES)
    return frame, (None if inline else payload)


def _header(frame: torch.Tensor) -> tuple[int, ...]:
    return _HEADER.unpack(ctypes.string_at(frame.data_ptr(), HEADER_BYTES))


def read_header(frame: torch.Tensor, *, expected_sender: int) -> tuple[int, bool]:
    """Check a received frame's header; return ``(payload bytes, whether the payload is inline)``."""
    magic, proto, _op, _words, _meta_len, total, _seq, sender, inline, _ = _header(frame)
    if magic != MAGIC:
        raise WireError(f"garbled message from rank {expected_sender}: bad magic {magic:#x} (different frame sizes on the two ranks?)")
    if proto != PROTOCOL:
        raise WireError(
            f"rank {expected_sender} speaks torch_pp wire protocol {proto}, this rank {PROTOCOL}: install the same torch_pp everywhere"
        )
    if sender != expected_sender:
        raise WireError(f"expected a message from rank {expected_sender}, got one from rank {sender}")
    return int(total), bool(inline)


def unpack(frame: torch.Tensor, rest: torch.Tensor | None = None) -> Received:
    """Rebuild a message from its frame (and the separate payload, if any); tensors are views into them."""
    _magic, _proto, op, words, meta_len, total, _seq, _sender, inline, _ = _header(frame)
    payload = frame[HEADER_BYTES : HEADER_BYTES + total] if inline else rest
    head = ctypes.string_at(payload.data_ptr(), words * 8 + meta_len)
    table = struct.unpack_from(f"<{words}q", head)
    layout, i = [], 0
    while i < words:
        ndim = table[i + 1]
        layout.append((_DTYPES[table[i]], table[i + 2 : i + 2 + ndim], table[i + 2 + ndim], table[i + 3 + ndim]))
        i += 4 + ndim
    meta = json.loads(head[words * 8 :]) if meta_len else {}
    return Received(Op(op), meta, payload[_aligned(words * 8 + meta_len) :], tuple(layout))
