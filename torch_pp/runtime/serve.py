"""Every rank but 0: the serve loop that runs this stage's layers on what arrives and passes it on.

The ring is 0 -> 1 -> ... -> N-1 -> 0 (rank 0's side: ``rank0.ring``). Each message that
arrives goes to the handler for its op (``Stage.HANDLERS``): FORWARD runs this stage's layers
and passes the hidden state on (the last stage returns it to rank 0 as RESULT, then, with a
split LM head, its rows' logits as a second reply); STATS adds this stage's figures; ERROR and
FREE pass on; ROWS moves rows between lanes' caches (continuous batching) and passes on; SHUTDOWN ends the loop. Only a message that expects a reply may cause one towards
rank 0: a failure on a streamed prefill chunk waits for that lane's reply-bearing message.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Callable

import torch

from . import activations
from ..devices import stamp
from ..devices.copies import Inbox, host_buffer
from ..errors import PipelineError
from ..model import rows
from ..model.stage import StageRunner
from ..trace import Tracer, now
from ..net.link import Link
from ..net.wire import Message, Op

log = logging.getLogger("torch_pp")


def serve(transport: Link, runner: StageRunner, *, device: torch.device, describe: Callable[[], dict]) -> None:
    """Serve this stage (ranks > 0) until rank 0 ends the session.

    Args:
        transport: The ring's link (see ``net.link.Link``).
        runner: This stage's layers and cache.
        device: Where this stage computes.
        describe: Returns this stage's figures for STATS.
    """
    Stage(transport, runner, device=device, describe=describe).run()


class Stage:
    """One stage's serve loop and the state its handlers share."""

    def __init__(self, transport: Link, runner: StageRunner, *, device: torch.device, describe: Callable[[], dict]) -> None:
        self.transport, self.runner, self.device, self.describe = transport, runner, device, describe
        self.rank = transport.rank
        self.next, self.prev = (self.rank + 1) % transport.world_size, (self.rank - 1) % transport.world_size
        self.is_last = self.next == 0
        self.where = f"stage {self.rank} on {transport.host} (layers {min(runner.layers)}:{max(runner.layers) + 1})"
        self.busy = {"compute_s": 0.0, "forwards": 0}
        self.tracer = Tracer()
        self.failed: dict[int, str] = {}  # lane -> a streamed chunk's failure, reported with that lane's next reply
        self.inbox = Inbox(device)
        transport.keep_host_memory(lambda nbytes: host_buffer(nbytes, device))

    def run(self) -> None:
        while True:
            t_wait = now()
            # Each message is done with (passed on, answered or dropped) before the next is received.
            msg = self.transport.recv(src=self.prev, kept=True)
            self.tracer.add("wait", t_wait, now())
            handler = self.HANDLERS.get(msg.op)
            if handler is None:
                raise PipelineError(f"rank {self.rank} got an unexpected {msg.op.name} from rank {self.prev}")
            if handler(self, msg):
                return

    def forward(self, msg: Message) -> None:
        """Run this stage's layers on the step and pass it on (or, on the last stage, answer rank 0)."""
        t_got = now()
        meta = msg.meta
        lane, reply, collect = meta.get("lane", 0), meta.get("reply", True), meta.get("collect", False)
        # Only a message that expects a reply may cause one: a stage that sent ERROR while
        # rank 0 still streams chunks would wait on rank 0 while rank 0 waits on it.
        error = self.failed.pop(lane, None) if reply else self.failed.get(lane)
        if error is not None and not reply:
            return  # this lane already failed: drop its remaining streamed chunks
        start = time.perf_counter()
        if error is None:
            out, error = self._layers(msg, lane=lane, collect=collect)
            if error is not None and not reply:
                self.failed[lane] = error
                return
        if error is not None:
            self.transport.send(Message(Op.ERROR, {"error": error, "req": meta.get("req")}), dst=self.next)
            return
        out, states = out if collect else (out, [])
        t_done = stamp(self.device)  # after the device finished this stage's kernels
        self.busy["compute_s"] += time.perf_counter() - start
        self.busy["forwards"] += 1
        self.tracer.add("compute", t_got, t_done)
        if not self.is_last:
            msg.tensors[0] = out
            if collect:  # later stages append theirs; the last stage returns them all
                meta["states"] = meta.get("states", []) + list(range(len(msg.tensors), len(msg.tensors) + len(states)))
                msg.tensors.extend(states)
            self.transport.send(msg, dst=self.next)
        elif reply:  # a streamed prefill chunk needs no answer
            t_done = self._answer(msg, out, states, t_done)
        self.tracer.add("send", t_done, now())

    def _layers(self, msg: Message, *, lane: int, collect: bool):
        """This stage's layers on the message: ``(output, None)``, or ``(None, error)`` naming this stage."""
        try:
            hidden, layer_kwargs, past_len, use_cache = activations.decode(msg.meta, self.inbox.place(msg))
            out = self.runner.forward(hidden, layer_kwargs, past_len=past_len, use_cache=use_cache, lane=lane, collect=collect,
                                      rewind=msg.meta.get("rewind", False), record=msg.meta.get("record", False))
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, the stage stays up
            log.debug("rank %d failed:\n%s", self.rank, traceback.format_exc())
            self.runner.free(lane)  # a half-updated cache must not be used again
            return None, f"{self.where} failed: {exc}"
        return out, None

    def _answer(self, msg: Message, out: torch.Tensor, states: list, t_done: float) -> float:
        """The last stage's RESULT to rank 0, then its rows of a split head's logits; returns when its
        own work ended."""
        meta = msg.meta
        keep = meta.get("keep", 0)
        earlier = [msg.tensors[i] for i in meta.get("states", [])]
        result = out[:, -keep:] if keep else out
        self.transport.send(Message(Op.RESULT, {"req": meta.get("req")}, [result, *earlier, *states]), dst=0)
        if meta.get("head"):  # rank 0 multiplies its rows of the head meanwhile
            t_sent = now()
            self.tracer.add("send", t_done, t_sent)
            logits = tail_logits(self.runner, result, meta["head"], where=f"stage {self.rank} on {self.transport.host}")
            t_done = now()  # tail_logits waited for the device
            self.tracer.add("compute", t_sent, t_done)
            self.transport.send(logits, dst=0)
        return t_done

    def stats(self, msg: Message) -> None:
        """Add this stage's figures (and its spans, if asked) and pass the message on."""
        figures = {**self.describe(), **self.busy}
        if msg.meta.get("spans_since") is not None:
            figures["spans"] = self.tracer.since(msg.meta["spans_since"])
        msg.meta["stages"].append(figures)
        self.transport.send(msg, dst=self.next)

    def error(self, msg: Message) -> None:
        """An earlier stage's failure: on towards rank 0."""
        self.transport.send(msg, dst=self.next)

    def free(self, msg: Message) -> None:
        """Drop the lanes whose caches rank 0 no longer holds."""
        for lane in msg.meta["lanes"]:
            self.runner.free(lane)
            self.failed.pop(lane, None)
        if not self.is_last:
            self.transport.send(msg, dst=self.next)

    def rows(self, msg: Message) -> None:
        """Move rows between lanes as rank 0 did (continuous batching: a request joins or leaves a batch).

        A failure is kept for the lane's next step, which reports it (nothing here answers).
        """
        lane = msg.meta["lane"]
        try:
            self.runner.move_rows(lane, [rows.Part.from_wire(p) for p in msg.meta["parts"]])
        except Exception as exc:  # noqa: BLE001 - reported with the lane's next reply
            log.debug("rank %d failed a row move:\n%s", self.rank, traceback.format_exc())
            self.runner.free(lane)
            self.failed[lane] = f"{self.where} failed to move rows into lane {lane}: {exc}"
        if not self.is_last:
            self.transport.send(msg, dst=self.next)

    def shutdown(self, msg: Message) -> bool:
        """End the session: drop every cache, pass the message on, stop serving."""
        self.runner.reset()
        self.transport.send(msg, dst=self.next)
        return True

    HANDLERS = {Op.FORWARD: forward, Op.STATS: stats, Op.ERROR: error, Op.FREE: free, Op.ROWS: rows,
                Op.SHUTDOWN: shutdown}


def tail_logits(runner: StageRunner, hidden: torch.Tensor, request: int, *, where: str) -> Message:
    """The last stage's rows of a split LM head for ``hidden`` [B, K, H], as the reply to ``request``
    with the seconds they took once the device finished (an ERROR naming this stage if they cannot
    be computed)."""
    try:
        if runner.tail is None:
            raise PipelineError("it holds no rows of the LM head; start every rank with the same split_head")
        start = now()
        logits = runner.tail.logits(hidden)
        return Message(Op.RESULT, {"req": request, "compute_s": stamp(hidden.device) - start}, [logits])
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, the stage stays up
        log.debug("%s failed on the LM head:\n%s", where, traceback.format_exc())
        return Message(Op.ERROR, {"error": f"{where} failed on its rows of the LM head: {exc}", "req": request})
