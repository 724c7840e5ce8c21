"""The driver's reply routing, alone: replies arriving in any order reach the threads that asked."""

from __future__ import annotations

import queue
import random
import threading

from torch_pp.net.wire import Message, Op
from torch_pp.rank0.replies import ReplyRouter


def test_each_thread_gets_its_own_reply_whatever_the_order():
    wire: queue.Queue = queue.Queue()
    router = ReplyRouter(lambda: wire.get(timeout=10))
    requests = list(range(1, 9))
    got: dict[int, Message] = {}
    waiting = threading.Barrier(len(requests) + 1)

    def ask(req: int) -> None:
        waiting.wait()
        got[req] = router.await_reply(req)

    threads = [threading.Thread(target=ask, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    waiting.wait()  # every thread is about to wait; now the stages answer, shuffled
    order = random.Random(0).sample(requests, len(requests))
    for r in order:
        wire.put(Message(Op.RESULT, {"req": r, "answer": r * 10}))
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a thread never got its reply"
    assert {r: m.meta["answer"] for r, m in got.items()} == {r: r * 10 for r in requests}


def test_a_reply_that_came_early_waits_in_the_stash():
    # Thread A receives for everyone and gets B's reply first: B, arriving later, finds it at once.
    wire: queue.Queue = queue.Queue()
    router = ReplyRouter(lambda: wire.get(timeout=10))
    wire.put(Message(Op.RESULT, {"req": 2}))
    wire.put(Message(Op.RESULT, {"req": 1}))
    assert router.await_reply(1).meta["req"] == 1
    assert wire.empty()
    assert router.await_reply(2).meta["req"] == 2  # from the stash, nothing left to receive


def test_the_receiver_role_passes_on_when_its_reply_is_in():
    # A's reply comes first, then B's: B, which had been waiting behind A, must start receiving.
    wire: queue.Queue = queue.Queue()
    router = ReplyRouter(lambda: wire.get(timeout=10))
    got = {}
    a = threading.Thread(target=lambda: got.setdefault("a", router.await_reply(1)))
    a.start()
    b = threading.Thread(target=lambda: got.setdefault("b", router.await_reply(2)))
    b.start()
    wire.put(Message(Op.RESULT, {"req": 1}))
    a.join(timeout=10)
    wire.put(Message(Op.RESULT, {"req": 2}))
    b.join(timeout=10)
    assert not a.is_alive() and not b.is_alive()
    assert got["a"].meta["req"] == 1 and got["b"].meta["req"] == 2
