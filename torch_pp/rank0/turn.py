"""One thread at a time does device work on rank 0 (see ``DeviceTurn``)."""

from __future__ import annotations

import collections
import contextlib
import threading


class DeviceTurn:
    """One thread at a time does device work in this process, a thread giving its turn up while it waits.

    MPS work from two Python threads can abort the process in Metal (pytorch#197805). Rank 0's
    threads (lanes, a server's requests) hold the turn while they compute and release it while
    they wait for the other stages; on every device alike, so CPU and CUDA runs take the path
    MPS takes. Re-entrant per thread (generate() calls forward()). First come, first served,
    and a ``generate()`` call passes its turn on after each token (``pass_on``): with nothing to
    wait for in between (one stage), a request would otherwise hold the device until it ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Threads waiting, in arrival order, each on its own condition: a release wakes only the
        # next one (a server's many waiting requests would all wake, and take the GIL, at every token).
        self._queue: collections.deque[threading.Condition] = collections.deque()
        self._held = False
        # Per thread: how deeply this thread holds the turn (generate() holds it and calls forward(),
        # which holds it again). The depth belongs to the thread, not to a step: the turn is what
        # threads take and give up, and a thread that gives it up for a wait must get its depth back.
        self._local = threading.local()

    def _acquire(self) -> None:
        with self._lock:
            if not self._held and not self._queue:
                self._held = True
                return
            me = threading.Condition(self._lock)
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    me.wait()
            except BaseException:  # an interrupt while waiting: leave the queue, or it would stall
                first = self._queue[0] is me
                self._queue.remove(me)
                if first and not self._held and self._queue:
                    self._queue[0].notify()
                raise
            self._queue.popleft()
            self._held = True

    def _release(self) -> None:
        with self._lock:
            self._held = False
            if self._queue:
                self._queue[0].notify()

    @contextlib.contextmanager
    def held(self):
        """Hold the turn for this block (nested blocks in one thread share it)."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._acquire()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._release()

    @contextlib.contextmanager
    def given_up(self):
        """Release the turn, if this thread holds it, for a block that does no device work (a wait)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = 0
            self._release()
        try:
            yield
        finally:
            if depth:
                self._acquire()
                self._local.depth = depth

    def pass_on(self) -> None:
        """Between two steps: if other threads wait for the turn, let them have it first."""
        if getattr(self._local, "depth", 0) and self._queue:
            with self.given_up():
                pass
