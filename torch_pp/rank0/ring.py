"""Rank 0's side of the ring: each step's round of the stages, and the session's control.

The ring is 0 -> 1 -> ... -> N-1 -> 0. Rank 0 sends FORWARD (activations plus the
remote layers' arguments) to rank 1; each stage runs its layers and passes the
message on (see ``runtime.serve``); the last stage returns only the final hidden state to
rank 0 as RESULT. A stage that fails sends ERROR on instead, which reaches rank 0
and is raised there, while every stage stays ready for the next request or SHUTDOWN.
Timing is the ``perf.StepTimer``'s; the replies' routing between threads ``rank0.replies``'.
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

from ..errors import PipelineError, StageError, TransportError
from ..net.link import Link
from ..net.wire import Message, Op
from ..devices import stamp
from ..devices.copies import host_buffer
from ..perf import StepTimer
from ..runtime import activations
from ..trace import now
from .outbox import Outbox
from .replies import ReplyRouter
from .step import Step
from .turn import DeviceTurn


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


class Ring:
    """Rank 0's side of the ring: runs the remote layers and controls the session.

    Several threads may call ``run_remote`` at once: sends are serialised, and each reply
    (tagged with its request's id) is routed to the thread that sent the request. Which KV
    cache a request uses on the stages (its lane) is separate: see ``rank0.lanes.CacheLanes``.

    Args:
        transport: The ring's link (see ``net.link.Link``).
        device: Rank 0's device.
        timer: Rank 0's step timer (``perf.StepTimer``).
        turn: Rank 0's device turn: given up while a thread waits on the wire, so that one
            thread at a time does device work (see ``rank0.turn.DeviceTurn``).
        freed: Returns the lanes whose rank-0 cache is gone since it was last called
            (``RemoteSpan.take_freed``); the ring tells the stages to drop them with its next send.
    """

    def __init__(self, transport: Link, *, device: torch.device, timer: StepTimer, turn: DeviceTurn,
                 freed: collections.abc.Callable[[], list[int]] = list) -> None:
        self.transport = transport
        self.device = device
        self.timer = timer
        self.turn = turn
        self.outbox = Outbox(device)
        if transport is not None:  # None: a rank 0 installed without a ring to talk to (a test of its layout)
            transport.keep_host_memory(lambda nbytes: host_buffer(nbytes, device))
        self.take_freed = freed
        self._send_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._replies = ReplyRouter(lambda: transport.recv(src=transport.world_size - 1))
        self.lost: str | None = None  # the liveness verdict, once a stage is lost: every call fails with it
        self.closed = False
        self.in_flight = 0  # threads inside a send or an exchange
        self._count = threading.Lock()

    @property
    def last_rank(self) -> int:
        return self.transport.world_size - 1

    def run_remote(self, hidden: torch.Tensor, step: Step, *, head=None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Send ``step``'s activations round the ring; return the final hidden state on rank 0's device.

        Args:
            hidden: [B, S, H] output of rank 0's layers.
            step: The forward's step: the remote layers' arguments (``pending``), the lane, its
                length (``past_len``), whether rank 0 cropped it (``rewind``) or records its past
                (``record``), and whether to cache; ``reply`` False for a pipelined
                prefill's non-final chunk (send and return at once, ``hidden`` coming back as a
                stand-in, so rank 0 can start the next chunk); ``keep``, the last positions to
                return ([B, keep, H]; 0: all); ``collect``, also return every remote layer's
                output, ``(hidden, [[B, S, H], ...])``.
            head: A ``rank0.head.SplitHead``: the last stage multiplies its rows of the LM head
                after returning the hidden state, while rank 0 multiplies its own
                (``head.begin``); their logits are joined (``head.finish``) before this returns.
        """
        self._check_lost()
        if self.closed:
            raise StageError("the pipeline is closed: start it again before running the model")
        busy = self.timer.pause(step)
        start = time.perf_counter()
        meta, tensors = activations.encode(hidden, step.pending, past_len=step.past_len, use_cache=step.use_cache)
        meta.update(reply=step.reply, keep=step.keep, lane=step.lane, collect=step.collect)
        if step.rewind:  # rank 0 cropped this lane's cache: the stages move it back to ``past_len`` too
            meta["rewind"] = True
        if step.record:
            meta["record"] = True
        tensors = self.outbox.stage(tensors)  # device work, while this thread still has the turn
        if not step.reply:
            with self.turn.given_up():
                self._send(Message(Op.FORWARD, meta, tensors))
            if busy:
                self.timer.resume(step)
            return hidden
        with self.turn.given_up():
            answer = self._exchange(Message(Op.FORWARD, meta, tensors), head=head, step=step)
        if answer.op == Op.ERROR:
            raise PipelineError(answer.meta["error"])
        if answer.op != Op.RESULT:
            raise PipelineError(f"rank 0 expected RESULT from rank {self.last_rank}, got {answer.op.name}")
        out = [t.to(self.device) for t in answer.tensors]
        self.timer.answered(time.perf_counter() - start)
        if busy:
            self.timer.resume(step)
        return (out[0], out[1:]) if step.collect else out[0]

    def release_freed(self) -> None:
        """Tell the stages now to drop the lanes whose caches are gone (sends normally carry this along)."""
        if not self.lost:
            with self.turn.given_up(), self._flight(), self._send_lock:
                self._send_free()

    def move_rows(self, lane: int, parts: list) -> None:
        """Tell the stages that ``lane``'s cache now holds ``parts``' rows (``model.rows.Part``, sources by
        lane), as rank 0's did: ordered before the lane's next step, which reports a stage's failure."""
        self._check_lost()
        with self.turn.given_up():  # a send can wait for a stage that waits for another thread here
            self._send(Message(Op.ROWS, {"lane": lane, "parts": [p.to_wire() for p in parts]}))

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
        self.timer.record("send", t0)

    def stage_lost(self, verdict: str) -> None:
        """The liveness verdict reached a rank 0 that keeps its process (a notebook kernel).

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

    def _exchange(self, message: Message, *, head=None, step: Step | None = None) -> Message:
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
            with self.timer.waiting():
                reply = self._replies.await_reply(request)
            self.timer.record("wait", t1)
            if head is not None and reply.op == Op.RESULT:
                reply = self._join_head(reply, head, message.meta["head"], step)
        if held.count:
            raise KeyboardInterrupt
        return reply

    def _join_head(self, reply: Message, head, request: int, step: Step) -> Message:
        """Rank 0's rows of a split LM head while the last stage multiplies its own, then theirs joined
        to them; returns ``reply`` with its hidden state on rank 0's device (or the stage's ERROR)."""
        with self.turn.held():
            t0 = now()
            reply.tensors[0] = reply.tensors[0].to(self.device)
            head.begin(reply.tensors[0], step)
            t1 = stamp(self.device)  # after the device finished (the span must not overlap another thread's)
        self.timer.record("compute", t0, t1)
        with self.timer.waiting():
            tail = self._replies.await_reply(request)
        self.timer.record("wait", t1)
        if tail.op != Op.RESULT:
            return tail
        # Not communication (``remote_s``): the longer of the two parts, which began about together.
        self.timer.remote_s -= max(t1 - t0, tail.meta.get("compute_s", 0.0))
        with self.turn.held():
            head.finish(tail.tensors[0].to(self.device), step)
        return reply

    def collect_stats(self, *, spans_since: float | None = None) -> list[dict]:
        """Each remote stage's figures (see ``runtime.serve``), in rank order; with their spans if asked."""
        reply = self._exchange(Message(Op.STATS, {"stages": [], "spans_since": spans_since}))
        if reply.op != Op.STATS:
            raise PipelineError(f"expected STATS back, got {reply.op.name}")
        return reply.meta["stages"]

    def shutdown(self) -> None:
        """End the session on every stage; returns once the message has gone round the ring. Later
        steps are refused."""
        self.closed = True
        reply = self._exchange(Message(Op.SHUTDOWN))
        if reply.op != Op.SHUTDOWN:
            raise PipelineError(f"expected SHUTDOWN back, got {reply.op.name}")
