"""The only module that talks to torch.distributed.

It joins a Gloo process group from torchrun's environment (or none at all for a
single process), moves framed messages (see ``wire``) between ranks through CPU
buffers, offers the collective the start-up agreement needs, and owns the
rendezvous-store connections used by the liveness monitor.

Before joining Gloo, every rank posts a "hello" (host, OS, versions, the address
Gloo will advertise) in torchrun's store, so that set-ups Gloo cannot join —
Linux with macOS, or a loopback address across machines — fail with a message
instead of a hang.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import wire
from .machine import machine_id, same_machine
from .liveness import Monitor
from .wire import Message

FRAME_BYTES = int(os.environ.get("TORCH_PP_FRAME_BYTES", wire.DEFAULT_FRAME_BYTES))
# Idle pipelines must not be torn down by Gloo: liveness is the monitor's job. Every send and
# receive waits this long; only forming the group has a deadline (TORCH_PP_JOIN_TIMEOUT).
IDLE_TIMEOUT = timedelta(days=365)
HELLO_TIMEOUT_S = float(os.environ.get("TORCH_PP_JOIN_TIMEOUT", "300"))


class TransportError(RuntimeError):
    """Communication with another rank failed; the message names the peer."""


@dataclass(frozen=True)
class SimulatedLink:
    """An opt-in simulated network link, a benchmarking aid (this kernel has no netem).

    Each send first waits ``latency_s`` plus the payload's time at ``gbit_per_s``.
    Never on by default: set ``TORCH_PP_SIM_LINK`` to a preset (10gbe, tb4, 1gbe,
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


def local_info() -> dict:
    """This process's facts for the start-up hello and ``doctor``."""
    import transformers

    from .._version import __version__

    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    return {
        "host": socket.gethostname(),
        "machine": machine_id(),
        "pid": os.getpid(),
        "os": platform.system(),
        "os_release": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_pp": __version__,
        "iface": iface,
        "address": advertised_address(iface),
    }


def advertised_address(iface: str | None) -> str | None:
    """The IPv4 address Gloo will advertise: the interface's, else the hostname's."""
    if iface:
        import psutil

        for addr in psutil.net_if_addrs().get(iface, []):
            if addr.family == socket.AF_INET:
                return addr.address
        return None
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def check_hellos(hellos: dict[int, dict]) -> None:
    """Refuse set-ups that Gloo cannot join, with a message instead of a hang.

    Raises:
        TransportError: for a Linux/macOS mixture, a missing interface, or a loopback address across machines.
    """
    systems: dict[str, list[int]] = {}
    for r, h in hellos.items():
        systems.setdefault(h["os"], []).append(r)
    if len(systems) > 1:
        listing = "; ".join(f"{name}: ranks {', '.join(map(str, rs))}" for name, rs in systems.items())
        raise TransportError(f"Gloo cannot join ranks on different operating systems ({listing}); run every stage on the same OS")
    for r, h in hellos.items():
        if h["iface"] and h["address"] is None:
            raise TransportError(f"rank {r} on {h['host']}: GLOO_SOCKET_IFNAME={h['iface']} has no IPv4 address; check the interface name")
    if not on_one_machine(hellos):
        for r, h in hellos.items():
            if h["address"] is None or ipaddress.ip_address(h["address"]).is_loopback:
                raise TransportError(
                    f"rank {r} on {h['host']} would advertise {h['address']} (loopback) to the other machines; "
                    "set GLOO_SOCKET_IFNAME to the interface that reaches them (launch/node.sh --iface)"
                )


def on_one_machine(hellos: dict[int, dict]) -> bool:
    first = next(iter(hellos.values()))
    return all(same_machine(first, h) for h in hellos.values())


def gloo_address(hellos: dict[int, dict], rank: int) -> str:
    """The IPv4 address this rank's Gloo device binds to and advertises.

    Gloo left to itself takes the first address of GLOO_SOCKET_IFNAME of any family (macOS
    lists the IPv6 link-local one first, which the other Mac may not reach) or resolves the
    hostname (mDNS on a Mac). So it is told: 127.0.0.1 when every rank is on this machine,
    else the IPv4 address that the hello reported and that ``doctor`` shows.
    """
    return "127.0.0.1" if on_one_machine(hellos) else hellos[rank]["address"]


def _form_group(store, *, rank: int, world_size: int, address: str, timeout_s: float):
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


def _join_failure(store, hellos: dict[int, dict], *, rank: int, address: str, seconds: float, exc: Exception) -> str:
    """Name the ranks this one could not connect to (those that did not form the group either)."""
    time.sleep(1.0)  # ranks that did connect mark it right away
    missing = []
    for r, h in hellos.items():
        try:
            joined = r == rank or store.check([f"joined/{r}"])
        except Exception:  # noqa: BLE001 - the store's host may have given up already
            joined = False
        if not joined:
            missing.append(f"rank {r} on {h['host']} ({gloo_address(hellos, r)})")
    who = ", ".join(missing) or "the other ranks"
    return (f"rank {rank} on {hellos[rank]['host']} ({address}) could not connect to {who} within {seconds:.0f} s "
            f"(TORCH_PP_JOIN_TIMEOUT): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Check that each "
            "machine can reach the others' addresses on the fast link (ping), the firewall (allow Python to accept "
            "incoming connections), and GLOO_SOCKET_IFNAME (launch/node.sh --iface)")


class Transport:
    """Framed point-to-point messages between the ranks of one pipeline.

    Attributes:
        rank: This process's global rank.
        world_size: Number of ranks (pipeline stages).
        local_rank: Rank on this machine.
        host: This machine's hostname.
        hellos: rank -> facts each rank posted at start-up (see ``local_info``).
        gloo_address: The IPv4 address this rank's Gloo device uses (None for a single process).
        monitor: The liveness monitor (None for a single process).
    """

    def __init__(self, *, rank: int, world_size: int, local_rank: int, hellos: dict[int, dict], owns_group: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.hellos = hellos
        self.host = hellos[rank]["host"]
        self.monitor: Monitor | None = None
        self.link = SimulatedLink.from_spec(os.environ.get("TORCH_PP_SIM_LINK"))
        self._owns_group = owns_group
        self._group = None  # the Gloo group (None for a single process)
        self.gloo_address: str | None = None  # the IPv4 address Gloo binds and advertises
        self._seq = 0
        self._gathers = 0
        self._frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)

    @classmethod
    def from_env(cls, *, handle_signals: bool = False) -> "Transport":
        """Join the group described by torchrun's variables, or run alone without them.

        Args:
            handle_signals: Let the liveness monitor act on SIGINT/SIGTERM (main thread only;
                the CLI does this so Ctrl-C on rank 0 stops every stage).

        Raises:
            TransportError: if the group cannot be formed, with the reason.
        """
        return cls.connect(
            rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            addr=os.environ.get("MASTER_ADDR", "127.0.0.1"), port=int(os.environ.get("MASTER_PORT", "29500")),
            host_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and int(os.environ.get("RANK", "0")) == 0,
            handle_signals=handle_signals,
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
            return cls(rank=0, world_size=1, local_rank=0, hellos={0: local_info()}, owns_group=False)

        def client():
            return dist.TCPStore(addr, port, None, is_master=False, timeout=timedelta(seconds=HELLO_TIMEOUT_S))

        try:
            base = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timedelta(seconds=HELLO_TIMEOUT_S),
                                 wait_for_workers=False) if host_store else client()
            store = dist.PrefixStore("torch_pp/", base)
            store.set(f"hello/{rank}", json.dumps(local_info()))
            keys = [f"hello/{r}" for r in range(world_size)]
            store.wait(keys, timedelta(seconds=HELLO_TIMEOUT_S))
            hellos = {r: json.loads(store.get(k)) for r, k in enumerate(keys)}
        except Exception as exc:  # noqa: BLE001
            raise TransportError(
                f"rank {rank} could not meet the other ranks at {addr}:{port}: {exc}. "
                "Check the master address and port, the firewall, and that every machine was started"
            ) from exc
        check_hellos(hellos)
        join_s = HELLO_TIMEOUT_S
        address = gloo_address(hellos, rank)
        try:
            group = _form_group(dist.PrefixStore("torch_pp_pg/", base), rank=rank, world_size=world_size,
                                address=address, timeout_s=join_s)
            store.set(f"joined/{rank}", "1")
        except Exception as exc:  # noqa: BLE001
            raise TransportError(_join_failure(store, hellos, rank=rank, address=address, seconds=join_s, exc=exc)) from exc
        t = cls(rank=rank, world_size=world_size, local_rank=local_rank, hellos=hellos, owns_group=True)
        t._group = group
        t.gloo_address = address
        t._store = store
        t._base_store = base  # keeps the store (and, on its host, the server) alive
        t._hosting = host_store
        t.monitor = Monitor(dist.PrefixStore("torch_pp/", client()), rank=rank, peers=hellos, exit_on_loss=exit_on_loss).start()
        if handle_signals:
            t.monitor.handle_signals()
        return t

    def publish(self, key: str, value: str) -> None:
        """Post a value for the other ranks (e.g. the driver's start options)."""
        self._store.set(f"pub/{key}", value)

    def fetch(self, key: str, *, timeout_s: float = HELLO_TIMEOUT_S) -> str:
        """Wait for a value another rank published."""
        self._store.wait([f"pub/{key}"], timedelta(seconds=timeout_s))
        return self._store.get(f"pub/{key}").decode()

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    def send(self, message: Message, dst: int) -> None:
        """Send one framed message to ``dst`` (blocks until Gloo has taken it)."""
        # A send returns once Gloo has taken the bytes, so one staging frame serves every send
        # (callers send from one thread at a time: the driver holds a lock, stages are single-threaded).
        frame, rest = wire.pack(message, seq=self._seq, sender=self.rank, frame_bytes=FRAME_BYTES, out=self._frame)
        self._seq += 1
        if self.link is not None:
            self.link.delay(frame.numel() + (rest.numel() if rest is not None else 0))
        try:
            self._group.send([frame], dst, 0).wait(IDLE_TIMEOUT)
            if rest is not None:
                self._group.send([rest], dst, 0).wait(IDLE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} could not send {message.op.name} to rank {dst}: {exc}") from exc

    def recv(self, src: int) -> Message:
        """Receive the next framed message from ``src``."""
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        rest = None
        try:
            self._group.recv([frame], src, 0).wait(IDLE_TIMEOUT)
            total, inline = wire.read_header(frame, expected_sender=src)
            if not inline:
                rest = torch.empty(total, dtype=torch.uint8)
                self._group.recv([rest], src, 0).wait(IDLE_TIMEOUT)
        except wire.WireError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"rank {self.rank} lost the connection to rank {src}: {exc}") from exc
        return wire.unpack(frame, rest)

    def all_gather(self, obj: object) -> list:
        """Every rank's ``obj`` (JSON-able), in rank order: the start-up agreement's collective.

        It goes through the rendezvous store as JSON, never pickle: unpickling what a peer sent
        would let anyone who reaches the master port run code on every rank.

        Raises:
            TransportError: if some rank does not post within ``TORCH_PP_JOIN_TIMEOUT``, naming it.
        """
        if self.world_size == 1:
            return [json.loads(json.dumps(obj))]
        self._gathers += 1
        keys = [f"gather/{self._gathers}/{r}" for r in range(self.world_size)]
        self._store.set(keys[self.rank], json.dumps(obj))
        try:
            self._store.wait(keys, timedelta(seconds=HELLO_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001
            missing = [r for r, k in enumerate(keys) if not self._store.check([k])]
            who = ", ".join(f"rank {r} ({self.hellos[r]['host']})" for r in missing) or "a rank"
            raise TransportError(f"rank {self.rank} waited {HELLO_TIMEOUT_S:.0f} s at start-up for {who}: {exc}") from exc
        return [json.loads(self._store.get(k)) for k in keys]

    def describe(self, *, layers: tuple[int, int]) -> None:
        """Tell the other ranks' liveness monitors what this rank serves."""
        if self.monitor is not None:
            self.monitor.describe(layers=layers)

    def close(self) -> None:
        """Leave the process group if this transport created it."""
        if self.monitor is not None:
            self.monitor.stop()
            if getattr(self, "_hosting", False):
                # This process serves the store: keep it up until every rank has left.
                others = [f"done/{r}" for r in range(self.world_size) if r != self.rank]
                deadline = time.monotonic() + (3 if self.monitor.verdict else 10)  # a lost rank never says done
                while time.monotonic() < deadline and not self._store.check(others):
                    time.sleep(0.05)
        if self._owns_group:
            self._group = None  # its connections close with it
            self._owns_group = False
