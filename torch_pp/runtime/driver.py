"""Rank 0's side of the ring: the driver.

The ring is 0 -> 1 -> ... -> N-1 -> 0. Rank 0 sends FORWARD (activations plus the
remote layers' arguments) to rank 1; each stage runs its layers and passes the
message on (see ``serve``); the last stage returns only the final hidden state to
rank 0 as RESULT. A stage that fails sends ERROR on instead, which reaches rank 0
and is raised there, while every stage stays ready for the next request or SHUTDOWN.
"""

from __future__ import annotations

import collections.abc
import contextlib
import itertools
import os
import signal
import sys
import threading
import time

import torch

from . import activations
from ..devices import stamp
from ..devices.copies import Outbox
from ..devices.turn import DeviceTurn
from ..trace import Tracer, now
from ..net.link import Link
from ..net.wire import Message, Op
from ..errors import PipelineError, TransportError
from .replies import ReplyRouter



class _Held:
    count = 0


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT back (count it) while a request and its reply are in flight.

    Python raises KeyboardInterrupt between any two bytecodes, which could drop a message
    already taken off the wire; holding it keeps the ring consistent. Main thread only
    (other threads never receive KeyboardInterrupt).
    """
    held = _Held()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def note(signum, frame):
        held.count += 1

    try:
        previous = signal.signal(signal.SIGINT, note)
    except ValueError:  # not allowed here (e.g. an embedded interpreter)
        yield held
        return
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


class Driver:
    """Rank 0's side of the ring: runs the remote layers and controls the session.

    Several threads may call ``run_remote`` at once: sends are serialised, and each reply
    (tagged with its request's id) is routed to the thread that sent the request. Which KV
    cache a request uses on the stages (its lane) is separate: see ``stage.RemoteSpan``.

    Args:
        transport: The ring's link (see ``net.link.Link``).
        device: Rank 0's device.
        freed: Returns the lanes whose rank-0 cache is gone since it was last called
            (``RemoteSpan.take_freed``); the driver tells the stages to drop them with its next send.
        turn: Rank 0's device turn: given up while a thread waits on the wire, so that one
            thread at a time does device work (see ``devices.turn.DeviceTurn``).
    """

    def __init__(self, transport: Link, *, device: torch.device, freed: collections.abc.Callable[[], list[int]] | None = None,
                 turn: DeviceTurn | None = None) -> None:
        self.transport = transport
        self.device = device
        self.turn = turn or DeviceTurn()
        # wall time waiting for the other stages: their layers and the wire (with a split head, less
        # the head's two parts, computed at the same time: see ``_join_head``)
        self.remote_s = 0.0
        self.calls = 0
        self.tracer = Tracer()
        self.outbox = Outbox(device)
        self.take_freed = freed or list
        self._local = threading.local()  # per thread: start of rank 0's current compute stretch
        self._send_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._replies = ReplyRouter(lambda: transport.recv(src=transport.world_size - 1))
        self.lost: str | None = None  # the liveness verdict, once a stage is lost: every call fails with it
        self.in_flight = 0  # threads inside a send or an exchange
        self._count = threading.Lock()
        # Threads inside generate() (``calling``), and how many of them wait for the ring: rank 0 is
        # idle only while all of them wait (``idle`` spans). With lanes, one lane's wait is not
        # idle time while another lane computes (``perf.breakdown``'s occupied time).
        self.callers = 0
        self._waiting = 0
        self._idle_since: float | None = None

    def mark_busy(self) -> None:
        """A forward pass starts on rank 0: compute until the next remote call; until the first
        one, its embedding and its own decoder layers (the ``layers`` span)."""
        self._local.busy_since = stamp(self.device)
        self._local.in_layers = True

    def mark_idle(self) -> None:
        """A forward pass ended on rank 0."""
        since = getattr(self._local, "busy_since", None)
        if since is not None:
            self.tracer.add("compute", since, stamp(self.device))
            self._local.busy_since = None

    def _pause_busy(self) -> bool:
        since = getattr(self._local, "busy_since", None)
        if since is not None:
            until = stamp(self.device)
            self.tracer.add("compute", since, until)
            if self._local.in_layers:  # rank 0's own layers, told apart for ``Pipeline.balanced_plan``
                self.tracer.add("layers", since, until)
                self._local.in_layers = False
        return since is not None

    @contextlib.contextmanager
    def calling(self, threads: int = 1):
        """``threads`` threads (a call, or its lanes) run generate() steps until the block ends."""
        with self._count:
            self.callers += threads
        try:
            yield
        finally:
            with self._count:
                self.callers -= threads

    @contextlib.contextmanager
    def _awaiting(self):
        """This thread waits for a reply; the last caller to wait begins an ``idle`` span, the first to stop ends it."""
        with self._count:
            self._waiting += 1
            if self._waiting >= max(self.callers, 1) and self._idle_since is None:
                self._idle_since = now()
        try:
            yield
        finally:
            with self._count:
                self._waiting -= 1
                if self._idle_since is not None:
                    self.tracer.add("idle", self._idle_since, now())
                    self._idle_since = None

    @property
    def last_rank(self) -> int:
        return self.transport.world_size - 1

    def run_remote(self, hidden: torch.Tensor, layer_kwargs: dict[int, dict], *, past_len: int, use_cache: bool,
                   reply: bool = True, keep: int = 0, lane: int = 0, collect: bool = False,
                   head=None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Send activations round the ring; return the final hidden state on rank 0's device.

        Args:
            hidden: [B, S, H] output of rank 0's layers.
            layer_kwargs: Each remote layer's arguments.
            past_len: Tokens already in this lane's caches on the stages.
            use_cache: Whether the stages keep this step in their caches.
            reply: False for a pipelined prefill's non-final chunk: send and return at once
                (``hidden`` comes back as a stand-in), so rank 0 can start the next chunk.
            keep: Return only the last ``keep`` positions, [B, keep, H] (0: all S).
            lane: Which KV cache the stages use.
            collect: Also return every remote layer's output: ``(hidden, [[B, S, H], ...])``.
            head: A ``model.head.SplitHead``: the last stage multiplies its rows of the LM head
                after returning the hidden state, while rank 0 multiplies its own
                (``head.begin``); their logits are joined (``head.finish``) before this returns.
        """
        self._check_lost()
        busy = self._pause_busy()  # waits for rank 0's queued device work: not the stages' time
        start = time.perf_counter()
        meta, tensors = activations.encode(hidden, layer_kwargs, past_len=past_len, use_cache=use_cache)
        meta.update(reply=reply, keep=keep, lane=lane, collect=collect)
        tensors = self.outbox.stage(tensors)  # device work, while this thread still has the turn
        if not reply:
            with self.turn.given_up():
                self._send(Message(Op.FORWARD, meta, tensors))
            if busy:
                self._local.busy_since = now()
            return hidden
        with self.turn.given_up():
            answer = self._exchange(Message(Op.FORWARD, meta, tensors), head=head)
        if answer.op == Op.ERROR:
            raise PipelineError(answer.meta["error"])
        if answer.op != Op.RESULT:
            raise PipelineError(f"rank 0 expected RESULT from rank {self.last_rank}, got {answer.op.name}")
        out = [t.to(self.device) for t in answer.tensors]
        self.remote_s += time.perf_counter() - start
        self.calls += 1
        if busy:
            self._local.busy_since = now()
        return (out[0], out[1:]) if collect else out[0]

    def release_freed(self) -> None:
        """Tell the stages now to drop the lanes whose caches are gone (sends normally carry this along)."""
        if not self.lost:
            with self._flight(), self._send_lock:
                self._send_free()

    def _send_free(self) -> None:
        """A FREE for the lanes gone since the last send, if any (the caller holds the send lock)."""
        lanes = self.take_freed()
        if lanes:
            self.transport.send(Message(Op.FREE, {"lanes": lanes}), dst=1)

    def _send(self, message: Message) -> None:
        with self._flight():
            self._put(message)

    def _put(self, message: Message) -> None:
        """One send to rank 1 (after any pending FREE), serialised between threads, traced."""
        with self._send_lock:
            t0 = now()
            self._send_free()
            self.transport.send(message, dst=1)
        self.tracer.add("send", t0, now())

    def stage_lost(self, verdict: str) -> None:
        """The liveness verdict reached a driver that keeps its process (a notebook kernel).

        Every later call fails with the verdict. A call blocked on the wire comes back by
        itself when the lost stage's connection closed (a dead process); if it is still
        blocked after a few seconds (a machine cut off the network), no Gloo call can be
        interrupted, so the process ends with the message rather than hang.
        """
        self.lost = verdict
        deadline = time.monotonic() + 5
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight:
            print(f"torch_pp: error: {verdict}; rank 0 is blocked waiting for that stage and must stop", file=sys.stderr, flush=True)
            os._exit(1)

    def _check_lost(self) -> None:
        if self.lost:
            raise PipelineError(f"{self.lost}; this pipeline is closed: start a new one")

    @contextlib.contextmanager
    def _flight(self):
        """Count this thread as inside the wire; a failure becomes the liveness verdict where there is one."""
        with self._count:
            self.in_flight += 1
        failure = None
        try:
            yield
        except TransportError as exc:
            failure = exc
        finally:
            with self._count:
                self.in_flight -= 1
        if failure is not None:
            monitor = self.transport.monitor
            if monitor is None or monitor.exit_on_loss:
                raise failure  # the process ends with the monitor's message (see cli)
            monitor.await_verdict()  # names the lost stage, usually within a second
            self.lost = self.lost or monitor.verdict or str(failure)
            raise PipelineError(f"{self.lost}; this pipeline is closed: start a new one") from failure

    def _exchange(self, message: Message, *, head=None) -> Message:
        """Send round the ring and take this request's reply, even if interrupted in between.

        A KeyboardInterrupt (a notebook's interrupt button) that lands after the send is held
        back until the reply is in (with ``head``, both replies: see ``run_remote``), so the ring
        never keeps a stale message and the pipeline stays usable; the interrupt is then raised.
        """
        self._check_lost()
        request = next(self._request_ids)
        message.meta["req"] = request
        if head is not None:  # the last stage's logits come back as a reply of their own
            message.meta["head"] = next(self._request_ids)
        with _interrupts_held() as held, self._flight():
            self._put(message)
            t1 = now()
            with self._awaiting():
                reply = self._replies.await_reply(request)
            self.tracer.add("wait", t1, now())
            if head is not None and reply.op == Op.RESULT:
                reply = self._join_head(reply, head, message.meta["head"])
        if held.count:
            raise KeyboardInterrupt
        return reply

    def _join_head(self, reply: Message, head, request: int) -> Message:
        """Rank 0's rows of a split LM head while the last stage multiplies its own, then theirs joined
        to them; returns ``reply`` with its hidden state on rank 0's device (or the stage's ERROR)."""
        with self.turn.held():
            t0 = now()
            reply.tensors[0] = reply.tensors[0].to(self.device)
            head.begin(reply.tensors[0])
            t1 = stamp(self.device)  # after the device finished (the span must not overlap another thread's)
        self.tracer.add("compute", t0, t1)
        with self._awaiting():
            tail = self._replies.await_reply(request)
        self.tracer.add("wait", t1, now())
        if tail.op != Op.RESULT:
            return tail
        # Not communication (``remote_s``): the longer of the two parts, which began about together.
        self.remote_s -= max(t1 - t0, tail.meta.get("compute_s", 0.0))
        with self.turn.held():
            head.finish(tail.tensors[0].to(self.device))
        return reply

    def collect_stats(self, *, spans_since: float | None = None) -> list[dict]:
        """Each remote stage's figures (see ``serve``), in rank order; with their spans if asked."""
        reply = self._exchange(Message(Op.STATS, {"stages": [], "spans_since": spans_since}))
        if reply.op != Op.STATS:
            raise PipelineError(f"expected STATS back, got {reply.op.name}")
        return reply.meta["stages"]

    def shutdown(self) -> None:
        """End the session on every stage; returns once the message has gone round the ring."""
        reply = self._exchange(Message(Op.SHUTDOWN))
        if reply.op != Op.SHUTDOWN:
            raise PipelineError(f"expected SHUTDOWN back, got {reply.op.name}")
