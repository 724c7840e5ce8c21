"""Liveness: no silent hangs, and no teardown of an idle pipeline.

Gloo's own timeout cannot tell an idle pipeline (a notebook waiting for its next
cell) from a dead one, so the process group gets a very long timeout and this
monitor decides instead. A daemon thread on every rank:

* bumps a heartbeat counter in the rendezvous store every second;
* watches every other rank: a rank on this machine is lost the moment its
  process is gone; a rank elsewhere when its counter has not moved for
  ``stale_s`` seconds (counters, not clocks, so clock skew does not matter);
* watches for a shutdown request (Ctrl-C on rank 0) and, when asked to handle
  signals, for SIGINT/SIGTERM delivered to this process.

When a peer is lost it prints one line naming the lost stage (rank, host,
layers) and ends this process with exit code 1. The first rank to notice also
posts that verdict in the store, so every survivor reports the same lost stage
rather than whatever it sees next (often the store itself going away with
rank 0's machine), and rank 0 lingers briefly so survivors can read it.
A rank that leaves normally first marks itself done, so its silence is not
mistaken for a failure.

Watching only finds what happened (an ``_Outcome``); one policy, ``Monitor._act``, acts on it.
A driver inside a notebook kernel must not end its process: built with
``exit_on_loss=False``, the monitor records the verdict, hands it to ``on_lost``
and stops watching; the pipeline then fails its calls with that message.
The store is any object with ``set``, ``get``, ``add`` and ``check`` (a c10d store).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

import psutil

from ..options import Settings
from .machine import same_machine

HEARTBEAT_S = 1.0
POLL_S = 0.5


def _alive(pid: int) -> bool:
    """Whether a process on this machine still runs (a zombie, dead but not yet reaped by its
    parent, does not: a notebook that started its workers is their parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_launcher(*, rank: int, interval_s: float = 1.0) -> threading.Thread | None:
    """Under torchrun, end this worker within seconds once the agent that started it is gone.

    torchrun starts each worker in a session of its own, so a kill of the agent's process group
    (a harness's timeout, ``kill -9`` of the launch command) leaves the worker running under
    init, waiting for peers until its join deadline or for ever. Watched from the first line of
    ``main``, before the rendezvous, since that is where such a worker waits. Returns the watching
    daemon thread (None when not started by torchrun).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent and _alive(agent):
            time.sleep(interval_s)
        import socket

        print(f"torch_pp: error: rank {rank} on {socket.gethostname()}: the torchrun agent that started this worker "
              f"(pid {agent}) is gone; stopping. Start torchrun on this machine again", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="torch_pp-launcher-watch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class _Outcome:
    """What the watching found, for the one policy that acts on it (``Monitor._act``).

    Attributes:
        message: The line printed when the process ends.
        code: The process's exit code.
        verdict: The lost stage, for a loss (None for a stop request or a signal, which
            always end the process).
    """

    message: str
    code: int
    verdict: str | None = None


class Monitor:
    """Heartbeats and peer watching for one rank.

    Args:
        store: A c10d store reserved for this monitor (its own connection).
        rank: This rank.
        peers: rank -> {"host", "pid"} for every rank, from the start-up hello.
        exit_on_loss: End this process when a peer is lost (False: record the verdict,
            call ``on_lost(verdict)`` and stop watching).
    """

    def __init__(self, store, *, rank: int, peers: dict[int, dict], exit_on_loss: bool = True) -> None:
        self.store = store
        self.rank = rank
        self.peers = peers
        self.exit_on_loss = exit_on_loss
        self.verdict: str | None = None
        self.on_lost = None  # callable(verdict), run on the monitor thread
        self.host = peers[rank]["host"]
        self.stale_s = Settings.from_env().stale_s  # TORCH_PP_STALE_S
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}
        self._roles: dict[int, str] = {}
        self._wakeup_r: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"torch_pp-liveness-{rank}", daemon=True)

    def start(self) -> "Monitor":
        self.store.set(f"hb/{self.rank}", "0")
        self._thread.start()
        return self

    def describe(self, *, layers: tuple[int, int]) -> None:
        """Record what this rank serves, for other ranks' messages."""
        self.store.set(f"role/{self.rank}", f"layers {layers[0]}:{layers[1]}")

    def handle_signals(self) -> None:
        """Route SIGINT/SIGTERM to the monitor, which acts even while the main thread is inside Gloo.

        Must be called from the main thread.
        """
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wakeup_r = r
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, lambda *_: None)  # the monitor decides
        signal.signal(signal.SIGINT, lambda *_: None)

    def stop(self) -> None:
        """Leave normally: mark this rank done so peers do not report it lost."""
        self._stop.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store may already be gone at exit
            pass

    def await_verdict(self, timeout_s: float | None = None) -> None:
        """After a communication error, give the monitor time to find (and report) the lost stage."""
        deadline = time.monotonic() + (self.stale_s + 4 if timeout_s is None else timeout_s)
        while self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- the thread -------------------------------------------------------

    def _run(self) -> None:
        outcome = self._watch()
        if outcome is not None:
            self._act(outcome)

    def _act(self, outcome: _Outcome) -> None:
        """The one policy: end the process, or (a notebook's driver, for a lost stage) record the
        verdict, stop watching and tell ``on_lost``."""
        if outcome.verdict is None or self.exit_on_loss:
            self._exit(outcome.message, outcome.code)
        self.verdict = outcome.verdict
        self._stop.set()
        if self.on_lost is not None:
            self.on_lost(outcome.verdict)

    def _watch(self) -> _Outcome | None:
        """Heartbeat and watch until stopped (None) or until something must be acted on."""
        beat, last_beat = 0, 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now - last_beat >= HEARTBEAT_S:
                    beat += 1
                    self.store.set(f"hb/{self.rank}", str(beat))
                    last_beat = now
                if self.store.check(["shutdown"]) and self.rank != 0:
                    reason = self.store.get("shutdown").decode()
                    return _Outcome(f"torch_pp: rank {self.rank}: the pipeline was stopped on rank 0 ({reason})", 0)
                posted = self._posted_verdict()
                if posted is not None:
                    return self._stopping(posted)
                lost = self._lost_peer(now)
            except Exception as exc:  # noqa: BLE001 - the store's host is gone
                if self._stop.is_set():
                    return None
                return self._store_lost(exc)
            if lost is not None:
                return self._declare_lost(lost)
            outcome = self._check_signals()
            if outcome is not None:
                return outcome
        return None

    def _lost_peer(self, now: float) -> int | None:
        for r, info in self.peers.items():
            if r == self.rank or self.store.check([f"done/{r}"]):
                continue
            if r not in self._roles and self.store.check([f"role/{r}"]):
                self._roles[r] = self.store.get(f"role/{r}").decode()
            if same_machine(info, self.peers[self.rank]) and not _alive(info["pid"]):
                if not self.store.check([f"done/{r}"]):
                    return r
                continue
            # check, then get: a get of a key not yet posted would block this thread (and every other
            # user of this store connection) until the store's timeout. A monitor not yet started
            # counts as silent from the first look, so one that never starts is still found.
            count = int(self.store.get(f"hb/{r}")) if self.store.check([f"hb/{r}"]) else -1
            seen = self._seen.get(r)
            if seen is None or seen[0] != count:
                self._seen[r] = (count, now)
            elif now - seen[1] > self.stale_s:
                return r
        return None

    @staticmethod
    def lost_rank(verdict: str | None) -> int | None:
        """The rank a verdict (``_lost_message``'s, possibly another rank's) names as lost, if any."""
        match = re.match(r"lost stage (\d+) on ", verdict or "")
        return int(match.group(1)) if match else None

    def _lost_message(self, r: int, why: str | None = None) -> str:
        role = self._roles.get(r, "not yet loaded")
        if why is None:
            why = "its process ended" if same_machine(self.peers[r], self.peers[self.rank]) else f"no heartbeat for {self.stale_s:.0f} s (process dead or network down)"
        return f"lost stage {r} on {self.peers[r]['host']} ({role}): {why}"

    def _posted_verdict(self) -> str | None:
        """Another rank's verdict, if one was posted."""
        return self.store.get("lost").decode() if self.store.check(["lost"]) else None

    def _declare_lost(self, r: int) -> _Outcome:
        """Post the verdict for every survivor, then stop this rank."""
        verdict = self._lost_message(r)
        try:
            self.store.compare_set("lost", "", verdict)  # the first verdict wins
            verdict = self.store.get("lost").decode()
        except Exception:  # noqa: BLE001 - the store may be going away too
            pass
        if self.rank == 0:
            self._await_survivors(lost=r)
        return self._stopping(verdict)

    def _await_survivors(self, *, lost: int, timeout_s: float = 3.0) -> None:
        """Rank 0's machine hosts the store: keep it up until the survivors have read the verdict."""
        deadline = time.monotonic() + timeout_s
        waiting = [r for r in self.peers if r not in (self.rank, lost)]
        while waiting and time.monotonic() < deadline:
            try:
                waiting = [r for r in waiting if not self.store.check([f"done/{r}"])]
            except Exception:  # noqa: BLE001
                return
            time.sleep(0.05)

    def _store_lost(self, exc: Exception) -> _Outcome:
        """The store is unreachable: name the stage whose heartbeat went quiet first, if any did."""
        now = time.monotonic()
        quiet = {r: now - t for r, (_, t) in self._seen.items() if now - t > 2.5 * HEARTBEAT_S}
        if quiet:
            r = max(quiet, key=quiet.get)
            return self._stopping(self._lost_message(r, f"no heartbeat for {quiet[r]:.0f} s, then rank 0's store went away"))
        addr = os.environ.get("MASTER_ADDR")
        where = f" ({addr}:{os.environ.get('MASTER_PORT')})" if addr else ""
        verdict = (f"rank {self.rank} lost the rendezvous store on rank 0's machine{where}: {exc}. "
                   "Stage 0 is gone or unreachable")
        return _Outcome(f"torch_pp: error: {verdict}", 1, verdict)

    def _stopping(self, verdict: str) -> _Outcome:
        return _Outcome(f"torch_pp: error: {verdict}; rank {self.rank} on {self.host} is stopping", 1, verdict)

    def _check_signals(self) -> _Outcome | None:
        """Wait one poll for a signal (or just sleep); a signal ends the process."""
        if self._wakeup_r is None:
            time.sleep(POLL_S)
            return None
        import select

        ready, _, _ = select.select([self._wakeup_r], [], [], POLL_S)
        if not ready:
            return None
        signums = os.read(self._wakeup_r, 64)
        try:
            posted = self._posted_verdict()
            if posted is not None:
                return self._stopping(posted)
            lost = self._lost_peer(time.monotonic())
        except Exception:  # noqa: BLE001
            lost = None
        if lost is not None:  # torchrun stops us because a stage died: say which
            return self._declare_lost(lost)
        if self.rank == 0:
            name = "Ctrl-C" if signal.SIGINT in signums else "terminated"
            try:
                self.store.set("shutdown", f"{name} on {self.host}")
            except Exception:  # noqa: BLE001
                pass
            return _Outcome(f"torch_pp: {name}: stopping every stage", 130 if signal.SIGINT in signums else 143)
        return _Outcome(f"torch_pp: rank {self.rank}: stopped by a signal", 143)

    def _exit(self, message: str, code: int) -> None:
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        print(message, file=sys.stderr, flush=True)
        os._exit(code)
