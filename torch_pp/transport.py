"""The only module that talks to torch.distributed.

It starts a Gloo process group from torchrun's environment (or none at all for a
single process), moves framed messages (see ``wire``) between ranks through CPU
buffers, and offers the one collective the start-up needs. Nothing here knows
about models.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from . import wire
from .wire import Message

DEFAULT_TIMEOUT_S = float(os.environ.get("TORCH_PP_TIMEOUT", "3600"))
FRAME_BYTES = int(os.environ.get("TORCH_PP_FRAME_BYTES", wire.DEFAULT_FRAME_BYTES))


class TransportError(RuntimeError):
    """Communication with another rank failed; the message names the peer."""


class Transport:
    """Framed point-to-point messages between the ranks of one pipeline.

    Attributes:
        rank: This process's global rank.
        world_size: Number of ranks (pipeline stages).
        local_rank: Rank on this machine.
        host: This machine's hostname.
    """

    def __init__(self, *, rank: int, world_size: int, local_rank: int, owns_group: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.host = socket.gethostname()
        self._owns_group = owns_group
        self._seq = 0

    @classmethod
    def from_env(cls, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Transport":
        """Join the Gloo group described by torchrun's variables, or run alone without them.

        Raises:
            TransportError: if the group cannot be formed.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world_size == 1:
            return cls(rank=0, world_size=1, local_rank=0, owns_group=False)
        if dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=False)
        try:
            dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001 - re-raised with context for people
            raise TransportError(
                f"rank {rank} could not join the Gloo group at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {exc}. "
                "Check the master address and port, the firewall, and GLOO_SOCKET_IFNAME"
            ) from exc
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=True)

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    def send(self, message: Message, dst: int) -> None:
        """Send one framed message to ``dst`` (blocks until Gloo has taken it)."""
        frame, rest = wire.pack(message, seq=self._seq, sender=self.rank, frame_bytes=FRAME_BYTES)
        self._seq += 1
        try:
            dist.send(frame, dst)
            if rest is not None:
                dist.send(rest, dst)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} could not send {message.op.name} to rank {dst}: {exc}") from exc

    def recv(self, src: int) -> Message:
        """Receive the next framed message from ``src``."""
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        rest = None
        try:
            dist.recv(frame, src)
            total, inline = wire.read_header(frame, expected_sender=src)
            if not inline:
                rest = torch.empty(total, dtype=torch.uint8)
                dist.recv(rest, src)
        except wire.WireError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} lost the connection to rank {src}: {exc}") from exc
        return wire.unpack(frame, rest)

    def all_gather_object(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order (start-up agreement only)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group if this transport created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
