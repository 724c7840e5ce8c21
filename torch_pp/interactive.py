"""Interactive use: the calling process (a notebook kernel, a script) is the driver, rank 0.

* ``local_pipeline(model, stages=N)`` starts N-1 worker processes on this machine and
  returns the running pipeline.
* ``join(model, stages=N, port=P)`` waits for N-1 workers started on other machines with
  ``torchrun --nproc-per-node 1 --standalone -m torch_pp worker --driver ADDR:P --rank R --stages N``.

Workers take their options (model, plan, dtype, ...) from the driver, through the rendezvous
store, so the command on a worker machine names only where the driver is. Closing the
pipeline ends the workers; a new pipeline starts new ones. Only one pipeline is open per
process (a process holds one Gloo group): opening another closes the previous one.
"""

from __future__ import annotations

import atexit
import subprocess
import sys

from .errors import OptionsError
from .options import StartOptions, child_env
from .pipeline import Pipeline, start
from .net.rendezvous import free_port
from .net.transport import Transport

# The open pipeline of this process (at most one: a process holds one Gloo group). Held
# strongly: a pipeline dropped without close() stays open until the next one starts,
# close_all() runs, or the process exits, each of which closes it and ends its workers.
_open: list[Pipeline] = []


def _close_previous() -> None:
    while _open:
        _open.pop().close()


def _start_driver(transport: Transport, options: StartOptions) -> Pipeline:
    """Publish the options for the workers, then start rank 0; on any failure leave no group behind."""
    try:
        if transport.world_size > 1:
            transport.publish("job", options.to_json())
        pipe = start(options=options, transport=transport)
    except BaseException:
        transport.close()
        raise
    pipe.owns_transport = True
    _open.append(pipe)
    return pipe


def local_pipeline(model=None, *, stages: int = 2, threads: int | None = 1, **options) -> Pipeline:
    """Start an N-stage pipeline on this machine; this process becomes rank 0.

    Args:
        model: Hugging Face model folder; None for the embedded SmolLM2-135M-Instruct.
        stages: Number of stages (this process plus ``stages - 1`` workers).
        threads: Intra-op threads per worker process (None: torch's default).
        **options: ``start()`` options: layers, balance, context, max_memory, device, dtype, quantize, progress.

    Returns:
        The running pipeline; ``pipeline.model.generate(...)`` as with transformers.

    Raises:
        TypeError, OptionsError: for an unknown or out-of-range option, before anything starts.
    """
    opts = StartOptions(model=None if model is None else str(model), **options)  # fail before anything starts
    if not isinstance(stages, int) or stages < 1:
        raise OptionsError(f"stages must be a whole number of at least 1, not {stages!r}")
    _close_previous()
    port = free_port()
    env = child_env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch_pp", "worker", "--driver", f"127.0.0.1:{port}", "--rank", str(r),
                          "--stages", str(stages), "--local-rank", str(r)], env=env, stdin=subprocess.DEVNULL)
        for r in range(1, stages)
    ]
    try:
        transport = Transport.connect(rank=0, world_size=stages, addr="127.0.0.1", port=port, host_store=True,
                                      exit_on_loss=False)  # a lost worker must not end the kernel
        pipe = _start_driver(transport, opts)
    except BaseException:
        _kill(procs)
        raise
    pipe.on_close.append(lambda: _reap(procs))
    return pipe


def join(model=None, *, stages: int, port: int = 29600, **options) -> Pipeline:
    """Become rank 0 of a pipeline whose other stages run on other machines.

    On each worker machine r (1 .. stages-1), run::

        GLOO_SOCKET_IFNAME=en5 torchrun --nproc-per-node 1 --standalone \\
            -m torch_pp worker --driver <this machine's address>:<port> --rank r --stages N

    Set GLOO_SOCKET_IFNAME in this process's environment too (before calling) when the
    machines are linked by a dedicated interface.

    Args:
        model: Model folder, at the same path on every machine; None for the default model.
        stages: Number of stages, this process included.
        port: Port this process listens on for the workers (on all addresses).
        **options: ``start()`` options, applied on every rank.

    Raises:
        TypeError, OptionsError: for an unknown or out-of-range option, before anything starts.
    """
    opts = StartOptions(model=None if model is None else str(model), **options)
    _close_previous()
    transport = Transport.connect(rank=0, world_size=stages, addr="127.0.0.1", port=port, host_store=True,
                                  exit_on_loss=False)  # a lost worker must not end the kernel
    return _start_driver(transport, opts)


def close_all() -> None:
    """Close every open pipeline of this process and end its local workers."""
    _close_previous()


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def worker_main(*, driver: str, rank: int, stages: int, local_rank: int = 0) -> int:
    """A worker stage: meet the driver at ``driver`` (host:port), take its options, serve until closed."""
    addr, _, port = driver.rpartition(":")
    transport = Transport.connect(rank=rank, world_size=stages, addr=addr, port=int(port), local_rank=local_rank)
    try:
        start(options=StartOptions.from_json(transport.fetch("job")), transport=transport)
    finally:
        transport.close()
    return 0


atexit.register(close_all)
