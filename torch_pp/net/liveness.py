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

A driver inside a notebook kernel must not end its process: built with
``exit_on_loss=False``, the monitor records the verdict, hands it to ``on_lost``
and stops watching; the pipeline then fails its calls with that message.
The store is any object with ``set``, ``get``, ``add`` and ``check`` (a c10d store).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

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


class _Verdict(BaseException):
    """Ends the monitor thread of a rank that keeps its process (``exit_on_loss=False``)."""


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
        try:
            self._watch()
        except _Verdict:
            if self.on_lost is not None:
                self.on_lost(self.verdict)

    def _watch(self) -> None:
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
                    self._exit(f"torch_pp: rank {self.rank}: the pipeline was stopped on rank 0 ({reason})", 0)
                self._follow_posted_verdict()
                lost = self._lost_peer(now)
            except Exception as exc:  # noqa: BLE001 - the store's host is gone
                if self._stop.is_set():
                    return
                self._store_lost(exc)
            if lost is not None:
                self._declare_lost(lost)
            self._check_signals()

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

    def _lost_message(self, r: int, why: str | None = None) -> str:
        role = self._roles.get(r, "not yet loaded")
        if why is None:
            why = "its process ended" if same_machine(self.peers[r], self.peers[self.rank]) else f"no heartbeat for {self.stale_s:.0f} s (process dead or network down)"
        return f"lost stage {r} on {self.peers[r]['host']} ({role}): {why}"

    def _follow_posted_verdict(self) -> None:
        """Stop with another rank's verdict, if one was posted."""
        if self.store.check(["lost"]):
            self._stopping(self.store.get("lost").decode())

    def _declare_lost(self, r: int) -> None:
        """Post the verdict for every survivor, then stop this rank."""
        verdict = self._lost_message(r)
        try:
            self.store.compare_set("lost", "", verdict)  # the first verdict wins
            verdict = self.store.get("lost").decode()
        except Exception:  # noqa: BLE001 - the store may be going away too
            pass
        if self.rank == 0:
            self._await_survivors(lost=r)
        self._stopping(verdict)

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

    def _store_lost(self, exc: Exception) -> None:
        """The store is unreachable: name the stage whose heartbeat went quiet first, if any did."""
        now = time.monotonic()
        quiet = {r: now - t for r, (_, t) in self._seen.items() if now - t > 2.5 * HEARTBEAT_S}
        if quiet:
            r = max(quiet, key=quiet.get)
            self._stopping(self._lost_message(r, f"no heartbeat for {quiet[r]:.0f} s, then rank 0's store went away"))
        addr = os.environ.get("MASTER_ADDR")
        where = f" ({addr}:{os.environ.get('MASTER_PORT')})" if addr else ""
        self._fail(f"rank {self.rank} lost the rendezvous store on rank 0's machine{where}: {exc}. "
                   "Stage 0 is gone or unreachable")

    def _stopping(self, verdict: str) -> None:
        if not self.exit_on_loss:
            self._fail(verdict)
        self._exit(f"torch_pp: error: {verdict}; rank {self.rank} on {self.host} is stopping", 1)

    def _fail(self, verdict: str) -> None:
        if self.exit_on_loss:
            self._exit(f"torch_pp: error: {verdict}", 1)
        self.verdict = verdict
        self._stop.set()
        raise _Verdict

    def _check_signals(self) -> None:
        if self._wakeup_r is None:
            time.sleep(POLL_S)
            return
        import select

        ready, _, _ = select.select([self._wakeup_r], [], [], POLL_S)
        if not ready:
            return
        signums = os.read(self._wakeup_r, 64)
        try:
            self._follow_posted_verdict()
            lost = self._lost_peer(time.monotonic())
        except Exception:  # noqa: BLE001
            lost = None
        if lost is not None:  # torchrun stops us because a stage died: say which
            self._declare_lost(lost)
        if self.rank == 0:
            name = "Ctrl-C" if signal.SIGINT in signums else "terminated"
            try:
                self.store.set("shutdown", f"{name} on {self.host}")
            except Exception:  # noqa: BLE001
                pass
            self._exit(f"torch_pp: {name}: stopping every stage", 130 if signal.SIGINT in signums else 143)
        self._exit(f"torch_pp: rank {self.rank}: stopped by a signal", 143)

    def _exit(self, message: str, code: int) -> None:
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        print(message, file=sys.stderr, flush=True)
        os._exit(code)
