"""Long-lived threads for rank 0's concurrent ``generate()`` calls: lanes and a server's requests.

Why not a new thread per call: PyTorch keeps some state per thread, and a new thread starts
without it. cuDNN's attention plans are the costly one: PyTorch caches them per thread (cuDNN
does not promise that a plan is thread-safe), one per key/value length, each a few
milliseconds to build. A fresh thread therefore builds a plan at every decode step of its first
sequence, for every layer, however warm the process is (``bench/RESULTS.md``, "lanes"). Threads
kept across calls keep their plans, cuBLAS handles and workspaces.

Daemon threads, unlike ``concurrent.futures.ThreadPoolExecutor``'s, which the interpreter joins
at exit: a call blocked on a lost stage must never keep the process from ending.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class Workers:
    """A pool of daemon threads that grows as needed and reuses the most recently idle one first.

    Args:
        name: Prefix of the threads' names (``name-0``, ``name-1``, ...).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._idle: list[_Worker] = []  # a stack: the most recently used, warmest thread on top
        self._lock = threading.Lock()
        self._made = 0

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on an idle thread (a new one if none is idle)."""
        future: Future = Future()
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker, self._made = _Worker(self, f"{self.name}-{self._made}"), self._made + 1
        worker.tasks.put((future, fn, args, kwargs))
        return future

    @property
    def threads(self) -> int:
        """Threads made so far (idle or busy)."""
        return self._made

    def _back(self, worker: "_Worker") -> None:
        with self._lock:
            self._idle.append(worker)


class _Worker:
    def __init__(self, pool: Workers, name: str) -> None:
        self.pool = pool
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            future, fn, args, kwargs = self.tasks.get()
            result = error = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    error = exc
            # Drop the call's objects now: a lane's KV caches are freed on the stages when rank
            # 0's cache objects are collected (see ``rank0.lanes.CacheLanes``). Idle again before the
            # result is out, so that a caller's next call finds this thread free.
            del fn, args, kwargs
            self.pool._back(self)
            if error is not None:
                future.set_exception(error)
            elif future.running():
                future.set_result(result)
            del future, result, error

#: Rank 0's one pool: lanes and server requests share the warm threads.
POOL = Workers("torch_pp-worker")
