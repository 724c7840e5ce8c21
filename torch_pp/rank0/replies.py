"""Routing replies to the threads that asked: the driver's only tricky threading.

Several threads on rank 0 (lanes, a server's requests) send requests round the ring and each
waits for the reply tagged with its request id (``meta["req"]``). Replies arrive on one
connection in whatever order the stages finish them. One waiting thread at a time receives for
everyone: it keeps the replies meant for others in a stash and wakes them, until its own
arrives; then another waiting thread takes over the receiving.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..net.wire import Message


class ReplyRouter:
    """Hands each received reply to the thread waiting for its request id.

    Args:
        receive: Blocks for the next reply from the ring (its ``meta["req"]`` names the request).
    """

    def __init__(self, receive: Callable[[], Message]) -> None:
        self._receive = receive
        self._cond = threading.Condition()
        self._receiving = False  # whether some thread is inside receive() for everyone
        self._stash: dict[int, Message] = {}  # replies that arrived for another thread

    def await_reply(self, request: int) -> Message:
        """Block until the reply to ``request`` arrives; receive for the other threads meanwhile."""
        with self._cond:
            while True:
                if request in self._stash:
                    return self._stash.pop(request)
                if not self._receiving:
                    break
                self._cond.wait()
            self._receiving = True
        try:
            while True:
                msg = self._receive()
                owner = msg.meta.get("req")
                if owner == request:
                    return msg
                with self._cond:
                    self._stash[owner] = msg
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._receiving = False
                self._cond.notify_all()
