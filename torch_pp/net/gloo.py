"""The Gloo link: framed messages between ranks through a Gloo process group of our own.

Gloo sends CPU tensors only, so every message is staged through contiguous CPU buffers
(see ``net.wire``). A Gloo send returns once the peer has posted the matching receive; sends
and receives wait a year (``IDLE_TIMEOUT``) because an idle pipeline must not be torn down:
liveness is the monitor's job. Only forming the group has a deadline.

A payload past the first frame (a prefill's hidden state: 12 MB for 1430 tokens of an 8B model)
goes through host buffers the link keeps and reuses, grown to the largest message so far: fresh
memory costs a page fault per 4 KiB at first touch, which made packing a 67 MB payload 47 ms on
the CI VM against 9 ms into kept memory (``bench/RESULTS.md``, "the prefill's hop"). Who owns the
device says how they are made (``host_memory``: page-locked on CUDA, so the device copies into
and out of them run at full speed).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from ..devices.copies import grown
from ..errors import TransportError
from . import wire
from .link import SimulatedLink
from .wire import Message

IDLE_TIMEOUT = timedelta(days=365)


def _pageable(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def form_group(store, *, rank: int, world_size: int, address: str, timeout_s: float):
    """A Gloo group on an explicit IPv4 device; raises if the full mesh does not connect in time.

    Gloo's own connect timeout is not a deadline (a rank waiting for a peer's incoming connection
    was seen to wait five times as long), so the group is formed in a helper thread and given up on
    at the deadline; the helper, stuck in Gloo, ends with the process.
    """
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    options._timeout = timedelta(seconds=timeout_s)  # connecting only: sends and receives pass IDLE_TIMEOUT
    result: dict = {}

    def form():
        try:
            result["group"] = dist.ProcessGroupGloo(store, rank, world_size, options)
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
            result["error"] = exc

    helper = threading.Thread(target=form, name="torch_pp-gloo-join", daemon=True)
    helper.start()
    helper.join(timeout_s + 1)
    if "error" in result:
        raise result["error"]
    if "group" not in result:
        raise TimeoutError(f"Gloo did not connect in {timeout_s:.0f} s")
    return result["group"]


class GlooLink:
    """A ``Link`` over a formed Gloo group (see ``form_group``).

    Args:
        group: The Gloo process group.
        rank: This rank.
        frame_bytes: Size of every message's first frame (the same on every rank).
        simulated: A simulated network to slow sends down to (benchmarks only).
    """

    def __init__(self, group, *, rank: int, frame_bytes: int, simulated: SimulatedLink | None = None) -> None:
        self.group = group
        self.rank = rank
        self.frame_bytes = frame_bytes
        self.simulated = simulated
        self._seq = 0
        self._frame = torch.empty(frame_bytes, dtype=torch.uint8)
        self.host_memory = _pageable  # nbytes -> a uint8 CPU tensor: how kept payload buffers are made
        self._kept: dict[str, torch.Tensor] = {}  # "send" / "recv" -> the payload buffer kept for it

    def _payload(self, use: str, nbytes: int) -> torch.Tensor:
        """The payload buffer kept for ``use``, at least ``nbytes`` long (grown by doubling, never shrunk)."""
        kept = self._kept[use] = grown(self._kept.get(use), nbytes, self.host_memory)
        return kept

    def send(self, message: Message, dst: int) -> None:
        """Send one framed message to ``dst`` (blocks until Gloo has taken it)."""
        # A send returns once Gloo has taken the bytes, so one staging frame serves every send
        # (callers send from one thread at a time: the driver holds a lock, stages are single-threaded).
        frame, rest = wire.pack(message, seq=self._seq, sender=self.rank, frame_bytes=self.frame_bytes, out=self._frame,
                                rest_out=lambda n: self._payload("send", n))
        self._seq += 1
        if self.simulated is not None:
            self.simulated.delay(frame.numel() + (rest.numel() if rest is not None else 0))
        try:
            self.group.send([frame], dst, 0).wait(IDLE_TIMEOUT)
            if rest is not None:
                self.group.send([rest], dst, 0).wait(IDLE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} could not send {message.op.name} to rank {dst}: {exc}") from exc

    def recv(self, src: int, *, kept: bool = False) -> Message:
        """Receive the next framed message from ``src``.

        Args:
            src: The sending rank.
            kept: The caller is done with the message (its tensors are views into the payload)
                before its next ``recv`` on this link: a payload past the frame may land in the
                buffer kept for receives. A thread that hands messages to others must not.
        """
        frame = torch.empty(self.frame_bytes, dtype=torch.uint8)
        rest = None
        try:
            self.group.recv([frame], src, 0).wait(IDLE_TIMEOUT)
            total, inline = wire.read_header(frame, expected_sender=src)
            if not inline:
                rest = self._payload("recv", total)[:total] if kept else torch.empty(total, dtype=torch.uint8)
                self.group.recv([rest], src, 0).wait(IDLE_TIMEOUT)
        except wire.WireError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} lost the connection to rank {src}: {exc}") from exc
        return wire.unpack(frame, rest)
