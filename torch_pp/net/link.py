"""The link interface: what the driver, the serve loop and ``doctor`` need from the wire.

A second transport (a faster path on a Thunderbolt bridge, RDMA on macOS if it ever runs)
only has to implement ``Link``. ``SimulatedLink`` slows any link down to a chosen network's
latency and bandwidth, for benchmarks (this kernel has no netem).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from ..errors import TransportError
from .wire import Message


class Link(Protocol):
    """Framed point-to-point messages between the ranks of one pipeline (see ``net.wire``).

    Attributes:
        rank: This process's rank.
        world_size: Number of ranks (pipeline stages).
        host: This machine's hostname (for messages).
        monitor: The liveness monitor (None for a single process): after a failed send or
            receive, it names the lost stage.
    """

    rank: int
    world_size: int
    host: str
    monitor: object | None

    def send(self, message: Message, dst: int) -> None:
        """Send one message to ``dst``; returns once the link has taken it.

        Raises:
            TransportError: naming the peer, when the link to it failed.
        """

    def recv(self, src: int, *, kept: bool = False) -> Message:
        """The next message from ``src``; with ``kept``, the caller is done with it before its next
        receive, so a large payload may land in a buffer the link reuses (see ``net.gloo``).

        Raises:
            TransportError: naming the peer, when the link to it failed.
        """

    def keep_host_memory(self, allocate) -> None:
        """How the buffers the link keeps for large payloads are made (``allocate(nbytes)``)."""


@dataclass(frozen=True)
class SimulatedLink:
    """An opt-in simulated network link, a benchmarking aid (this kernel has no netem).

    Each send first waits ``latency_s`` plus the payload's time at ``gbit_per_s``.
    Never on by default: set ``TORCH_PP_SIM_LINK`` (see ``options.Settings``) to a preset (10gbe, tb4, 1gbe,
    wifi) or to ``latency_ms=0.1,gbit=10``.
    """

    name: str
    latency_s: float
    gbit_per_s: float

    PRESETS = {  # one-way latency (ms), usable bandwidth (Gbit/s)
        "10gbe": (0.05, 9.4),
        "tb4": (0.04, 20.0),  # Thunderbolt 4 bridge (IP over Thunderbolt)
        "1gbe": (0.1, 0.94),
        "wifi": (2.0, 0.4),
    }

    @classmethod
    def from_spec(cls, spec: str | None) -> "SimulatedLink | None":
        if not spec:
            return None
        if spec.lower() in cls.PRESETS:
            ms, gbit = cls.PRESETS[spec.lower()]
            return cls(spec.lower(), ms / 1000, gbit)
        try:
            fields = dict(part.split("=") for part in spec.split(","))
            return cls(spec, float(fields.get("latency_ms", 0)) / 1000, float(fields.get("gbit", 1e9)))
        except ValueError:
            raise TransportError(
                f"bad TORCH_PP_SIM_LINK {spec!r}: use one of {', '.join(cls.PRESETS)} or latency_ms=X,gbit=Y"
            ) from None

    def delay(self, nbytes: int) -> None:
        """Wait as long as the link would take to deliver ``nbytes``."""
        until = time.perf_counter() + self.latency_s + nbytes * 8 / (self.gbit_per_s * 1e9)
        while (left := until - time.perf_counter()) > 0:
            # Sleep for the bulk, spin for the last stretch: sleep overshoots by ~0.1 ms.
            time.sleep(left - 0.0002) if left > 0.0005 else None
