"""Every rank but 0: the serve loop that runs this stage's layers on what arrives and passes it on.

See ``runtime`` for the ring and its messages. Only a message that expects a reply may cause one
towards rank 0: a failure on a streamed prefill chunk waits for that lane's reply-bearing message.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Callable

import torch

from . import activations
from ..devices import stamp
from ..devices.copies import Inbox
from ..errors import PipelineError
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
    rank = transport.rank
    nxt, prev = (rank + 1) % transport.world_size, (rank - 1) % transport.world_size
    is_last = nxt == 0
    first, last = min(runner.layers), max(runner.layers) + 1
    busy = {"compute_s": 0.0, "forwards": 0}
    tracer = Tracer()
    failed: dict[int, str] = {}  # lane -> a streamed chunk's failure, reported with that lane's next reply
    inbox = Inbox(device)
    while True:
        t_wait = now()
        msg = transport.recv(src=prev)
        t_got = now()
        tracer.add("wait", t_wait, t_got)
        if msg.op == Op.FORWARD:
            meta = msg.meta
            lane, reply, collect = meta.get("lane", 0), meta.get("reply", True), meta.get("collect", False)
            # Only a message that expects a reply may cause one: a stage that sent ERROR while
            # rank 0 still streams chunks would wait on rank 0 while rank 0 waits on it.
            error = failed.pop(lane, None) if reply else failed.get(lane)
            if error is not None and not reply:
                continue  # this lane already failed: drop its remaining streamed chunks
            if error is None:
                start = time.perf_counter()
                try:
                    hidden, layer_kwargs, past_len, use_cache = activations.decode(meta, inbox.place(msg))
                    out = runner.forward(hidden, layer_kwargs, past_len=past_len, use_cache=use_cache, lane=lane, collect=collect)
                except Exception as exc:  # noqa: BLE001 - reported to rank 0, the stage stays up
                    log.debug("rank %d failed:\n%s", rank, traceback.format_exc())
                    error = f"stage {rank} on {transport.host} (layers {first}:{last}) failed: {exc}"
                    runner.free(lane)  # a half-updated cache must not be used again
                    if not reply:
                        failed[lane] = error
                        continue
            if error is not None:
                transport.send(Message(Op.ERROR, {"error": error, "req": meta.get("req")}), dst=nxt)
                continue
            out, states = out if collect else (out, [])
            t_done = stamp(device)  # after the device finished this stage's kernels
            busy["compute_s"] += time.perf_counter() - start
            busy["forwards"] += 1
            tracer.add("compute", t_got, t_done)
            if is_last:
                if reply:  # a streamed prefill chunk needs no answer
                    keep = meta.get("keep", 0)
                    earlier = [msg.tensors[i] for i in meta.get("states", [])]
                    result = out[:, -keep:] if keep else out
                    transport.send(Message(Op.RESULT, {"req": meta.get("req")}, [result, *earlier, *states]), dst=0)
                    if meta.get("head"):  # rank 0 multiplies its rows of the head meanwhile
                        t_sent = now()
                        tracer.add("send", t_done, t_sent)
                        logits = _tail_logits(runner, result, meta["head"], where=f"stage {rank} on {transport.host}")
                        t_done = now()  # _tail_logits waited for the device
                        tracer.add("compute", t_sent, t_done)
                        transport.send(logits, dst=0)
            else:
                msg.tensors[0] = out
                if collect:  # later stages append theirs; the last stage returns them all
                    meta["states"] = meta.get("states", []) + list(range(len(msg.tensors), len(msg.tensors) + len(states)))
                    msg.tensors.extend(states)
                transport.send(msg, dst=nxt)
            tracer.add("send", t_done, now())
        elif msg.op == Op.STATS:
            figures = {**describe(), **busy}
            if msg.meta.get("spans_since") is not None:
                figures["spans"] = tracer.since(msg.meta["spans_since"])
            msg.meta["stages"].append(figures)
            transport.send(msg, dst=nxt)
        elif msg.op == Op.ERROR:
            transport.send(msg, dst=nxt)
        elif msg.op == Op.FREE:
            for lane in msg.meta["lanes"]:
                runner.free(lane)
                failed.pop(lane, None)
            if not is_last:
                transport.send(msg, dst=nxt)
        elif msg.op == Op.SHUTDOWN:
            runner.reset()
            transport.send(msg, dst=nxt)
            return
        else:
            raise PipelineError(f"rank {rank} got an unexpected {msg.op.name} from rank {prev}")


def _tail_logits(runner: StageRunner, hidden: torch.Tensor, request: int, *, where: str) -> Message:
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
