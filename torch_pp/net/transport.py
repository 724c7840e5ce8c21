"""The transport: one pipeline's link and rendezvous, joined from torchrun's environment.

``Transport`` is what the rest of the package holds: it meets the other ranks through the
store (``net.rendezvous``), forms a Gloo group of its own on an explicit IPv4 address
(``net.gloo``), starts the liveness monitor, and then offers the ``net.link.Link`` interface
(framed ``send``/``recv``) plus the start-up collective. A single process needs none of it.
"""

from __future__ import annotations

import json
import os

from ..errors import TransportError
from ..options import Settings
from .gloo import GlooLink, form_group
from .link import SimulatedLink
from .liveness import Monitor
from .rendezvous import Rendezvous, check_hellos, gloo_address, join_failure, local_info
from .wire import Message


class Transport:
    """Framed point-to-point messages between the ranks of one pipeline (a ``net.link.Link``).

    Attributes:
        rank: This process's global rank.
        world_size: Number of ranks (pipeline stages).
        local_rank: Rank on this machine.
        host: This machine's hostname.
        hellos: rank -> facts each rank posted at start-up (see ``rendezvous.local_info``).
        gloo_address: The IPv4 address this rank's Gloo device uses (None for a single process).
        frame_bytes: Size of every message's first frame.
        monitor: The liveness monitor (None for a single process).
    """

    def __init__(self, *, rank: int, world_size: int, local_rank: int, hellos: dict[int, dict],
                 rendezvous: Rendezvous | None = None, link: GlooLink | None = None, gloo_address: str | None = None,
                 frame_bytes: int | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.hellos = hellos
        self.host = hellos[rank]["host"]
        self.gloo_address = gloo_address
        self.frame_bytes = frame_bytes or Settings.from_env().frame_bytes
        self.monitor: Monitor | None = None
        self.rendezvous = rendezvous
        self._link = link

    @classmethod
    def from_env(cls, *, handle_signals: bool = False, exit_on_loss: bool = True) -> "Transport":
        """Join the group described by torchrun's variables, or run alone without them.

        Args:
            handle_signals: Let the liveness monitor act on SIGINT/SIGTERM (main thread only;
                the CLI does this so Ctrl-C on rank 0 stops every stage).
            exit_on_loss: End this process when another rank is lost (False for a server's rank 0,
                which answers that a stage is lost instead).

        Raises:
            TransportError: if the group cannot be formed, with the reason.
        """
        env = os.environ
        rank = int(env.get("RANK", "0"))
        return cls.connect(
            rank=rank, world_size=int(env.get("WORLD_SIZE", "1")), local_rank=int(env.get("LOCAL_RANK", "0")),
            addr=env.get("MASTER_ADDR", "127.0.0.1"), port=int(env.get("MASTER_PORT", "29500")),
            host_store=env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0,
            handle_signals=handle_signals, exit_on_loss=exit_on_loss,
        )

    @classmethod
    def connect(cls, *, rank: int, world_size: int, addr: str, port: int, local_rank: int = 0,
                host_store: bool = False, handle_signals: bool = False, exit_on_loss: bool = True) -> "Transport":
        """Join a group explicitly: ``addr:port`` is the rendezvous store (rank 0's machine).

        Args:
            rank: This rank.
            world_size: Number of ranks.
            addr: Address of the store.
            port: Port of the store.
            local_rank: Rank on this machine.
            host_store: Serve the store from this process (rank 0 outside torchrun).
            handle_signals: See ``from_env``.
            exit_on_loss: End this process when another rank is lost (False for a notebook's
                driver: the pipeline fails its calls instead, see ``liveness.Monitor``).

        Raises:
            TransportError: if the group cannot be formed, with the reason.
        """
        if world_size == 1:
            return cls(rank=0, world_size=1, local_rank=0, hellos={0: local_info()})
        settings = Settings.from_env()
        rdv = Rendezvous(rank=rank, world_size=world_size, addr=addr, port=port, host_store=host_store,
                         timeout_s=settings.join_timeout_s)
        check_hellos(rdv.hellos)
        address = gloo_address(rdv.hellos, rank)
        try:
            group = form_group(rdv.group_store(), rank=rank, world_size=world_size, address=address,
                               timeout_s=settings.join_timeout_s)
            rdv.mark_joined()
        except Exception as exc:  # noqa: BLE001
            raise TransportError(join_failure(rdv.store, rdv.hellos, rank=rank, address=address,
                                              seconds=settings.join_timeout_s, exc=exc)) from exc
        link = GlooLink(group, rank=rank, frame_bytes=settings.frame_bytes, simulated=SimulatedLink.from_spec(settings.sim_link))
        t = cls(rank=rank, world_size=world_size, local_rank=local_rank, hellos=rdv.hellos, rendezvous=rdv, link=link,
                gloo_address=address, frame_bytes=settings.frame_bytes)
        t.monitor = Monitor(rdv.monitor_store(), rank=rank, peers=rdv.hellos, exit_on_loss=exit_on_loss).start()
        if handle_signals:
            t.monitor.handle_signals()
        return t

    # -- the Link interface ------------------------------------------------

    def send(self, message: Message, dst: int) -> None:
        """Send one framed message to ``dst`` (blocks until Gloo has taken it)."""
        self._link.send(message, dst)

    def recv(self, src: int, *, kept: bool = False) -> Message:
        """Receive the next framed message from ``src`` (``kept``: see ``GlooLink.recv``)."""
        return self._link.recv(src, kept=kept)

    def keep_host_memory(self, allocate) -> None:
        """How the link's kept payload buffers are made: ``allocate(nbytes)`` -> a uint8 CPU tensor
        (``devices.copies.host_buffer``: page-locked for a CUDA rank). Before the first message."""
        if self._link is not None:
            self._link.host_memory = allocate

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    # -- start-up ------------------------------------------------------------

    def all_gather(self, obj: object) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order: the start-up agreement's collective.

        It goes through the rendezvous store as JSON, never pickle: unpickling what a peer sent
        would let anyone who reaches the master port run code on every rank.

        Raises:
            TransportError: if some rank does not post within ``TORCH_PP_JOIN_TIMEOUT``, naming it.
        """
        if self.rendezvous is None:
            return [json.loads(json.dumps(obj))]  # as another rank would receive it
        return self.rendezvous.all_gather(obj)

    def publish(self, key: str, value: str) -> None:
        """Post a value for the other ranks (e.g. the driver's start options)."""
        self.rendezvous.publish(key, value)

    def fetch(self, key: str, *, timeout_s: float | None = None) -> str:
        """Wait for a value another rank published."""
        return self.rendezvous.fetch(key, timeout_s=timeout_s)

    def describe(self, *, layers: tuple[int, int]) -> None:
        """Tell the other ranks' liveness monitors what this rank serves."""
        if self.monitor is not None:
            self.monitor.describe(layers=layers)

    def close(self) -> None:
        """Leave the process group if this transport formed it."""
        if self.monitor is not None:
            self.monitor.stop()
            # A process serving the store keeps it up until every rank has left (a lost rank never says done).
            self.rendezvous.linger(seconds=3 if self.monitor.verdict else 10)
        self._link = None  # its connections close with the group

