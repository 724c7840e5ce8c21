"""The liveness monitor across hosts: every survivor names the same lost stage.

Real monitor processes on a real c10d TCPStore; each plays a rank on its own host, so
peers are watched through heartbeats only (as between two Macs).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import torch.distributed as dist

from conftest import ROOT, WORKERS, free_port

HOSTS = "h0,h1,h2"


def spawn(*args, stale: float) -> subprocess.Popen:
    env = {**os.environ, "TORCH_PP_STALE_S": str(stale)}
    proc = subprocess.Popen([sys.executable, str(WORKERS / "monitor_worker.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def go(port: int, ranks: list[int]) -> None:
    """Start every monitor at once, and return when each has said what it serves."""
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    client.set("go", "1")
    dist.PrefixStore("torch_pp/", client).wait([f"role/{r}" for r in ranks])


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, float, str]:
    start = time.monotonic()
    proc.wait(timeout=timeout)
    return proc.returncode, time.monotonic() - start, proc.stderr.read()


def kill_all(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_first_verdict_reaches_every_survivor():
    # Rank 0 notices quickly (2 s), rank 2 would take a minute on its own: it must stop
    # within a few seconds anyway, naming the stage rank 0 found, not the store going away.
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ranks = [spawn(0, port, HOSTS, stale=2), spawn(1, port, HOSTS, stale=60), spawn(2, port, HOSTS, stale=60)]
    try:
        go(port, [0, 1, 2])
        ranks[1].send_signal(signal.SIGKILL)
        results = {r: finish(ranks[r], timeout=30) for r in (0, 2)}
    finally:
        kill_all(*ranks)
        del store
    for r, (code, seconds, err) in results.items():
        assert code == 1, err
        assert "lost stage 1 on h1 (layers 10:20)" in err, err
        assert f"rank {r} on h{r} is stopping" in err, err
    assert results[2][1] < 10, f"rank 2 took {results[2][1]:.1f} s: it did not read rank 0's verdict"


def store_gone(*, quiet_peer_first: bool) -> tuple[int, float, str]:
    """Ranks 1 and 2 on their own hosts, the store on a third; maybe kill rank 1, then the store."""
    port = free_port()
    store = spawn("store", port, stale=60)
    ranks = [spawn(1, port, ",h1,h2", stale=60), spawn(2, port, ",h1,h2", stale=60)]
    try:
        go(port, [1, 2])
        if quiet_peer_first:
            ranks[0].send_signal(signal.SIGKILL)
            time.sleep(4)
        store.send_signal(signal.SIGKILL)
        return finish(ranks[1], timeout=30)
    finally:
        kill_all(store, *ranks)


def test_store_gone_after_a_quiet_peer_names_that_peer():
    # The store's host dies after stage 1 went quiet but before this rank's own threshold:
    # the message still names stage 1, the stage that failed first.
    code, seconds, err = store_gone(quiet_peer_first=True)
    assert code == 1, err
    assert "lost stage 1 on h1 (layers 10:20)" in err, err
    assert "then rank 0's store went away" in err, err
    assert seconds < 5, seconds


def test_store_gone_with_every_peer_alive_blames_the_store():
    code, _, err = store_gone(quiet_peer_first=False)
    assert code == 1, err
    assert "lost the rendezvous store" in err and "lost stage" not in err, err
