"""``torch_pp serve``: load the pipeline once, then rank 0 serves the OpenAI-compatible API over HTTP
while every other rank serves its stage; SIGINT or SIGTERM on rank 0 ends every rank cleanly."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("torch_pp")


def run_serve(args, options, transport) -> int:
    """Start the pipeline; on rank 0 serve HTTP until stopped, then close the pipeline."""
    import uvicorn

    from ..net.liveness import Monitor
    from ..pipeline import start
    from ..rank0.batch import refusal
    from ..rank0.batches import Batches, default_batches, making
    from ..rank0.many import choose_batches
    from .app import build_app
    from .engine import Engine

    pipe = start(options=options, transport=transport)
    if not pipe.is_driver:
        return 0
    with pipe:
        if args.host not in LOCAL_HOSTS and not args.api_key:
            print(f"torch_pp: warning: serving on {args.host} without --api-key: anyone who reaches port {args.port} "
                  "can use the model", file=sys.stderr, flush=True)
        speculate = ({"prompt_lookup_num_tokens": args.prompt_lookup} if args.prompt_lookup
                     else {} if pipe.draft is not None else None)
        count = default_batches(pipe.stats()) if args.batches == "auto" else int(args.batches)
        why = refusal(pipe.model) or ("the server speculates (--prompt-lookup, --draft-model): each request alone decides"
                                      if speculate is not None else None)
        if count and why:
            log.warning("torch_pp: no continuous batching: %s; one generate() per request, each in its own lane", why)
            count = 0
        measured = ""
        if count == 2 and args.batches == "auto":  # where two could pay, the machines decide
            count, rates = choose_batches(making(pipe.model, pipe.rank0), vocab_size=pipe.model.config.vocab_size,
                                          rows=min(8, args.max_concurrent))
            measured = f" (measured: {rates[1]:.1f} tok/s in one, {rates[2]:.1f} in two)"
        batches = Batches(count, making(pipe.model, pipe.rank0)) if count else None
        engine = Engine(pipe.model, pipe.tokenizer(), max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                        lost=lambda: pipe.rank0.ring.lost if pipe.rank0.ring else None,  # one stage: nothing to lose
                        speculate=None if batches else speculate, batches=batches)
        stages = [{"rank": r, "host": transport.hellos[r]["host"], "layers": list(pipe.plan.ranges[r])}
                  for r in range(pipe.plan.num_stages)]
        name = args.served_model_name or Path(pipe.model_dir).name

        def ready() -> None:
            shown = f"[{args.host}]" if ":" in args.host else args.host
            how = f"{count} running batch{'es' if count > 1 else ''}{measured}" if count else "one lane per request"
            print(f"torch_pp: serving {name} at http://{shown}:{args.port}/v1 ({len(stages)} stages; "
                  f"up to {args.max_concurrent} requests at once, {how})", flush=True)

        app = build_app(engine, model_name=name, stages=stages, api_key=args.api_key, lost_rank=Monitor.lost_rank,
                        stage_figures=pipe.stats)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               timeout_graceful_shutdown=3))
        _serve_until_signal(server, on_ready=ready)
        engine.drain()  # then the pipeline closes on every rank (leaving the with block)
        if batches is not None:
            batches.close()
    if not server.started:
        print(f"torch_pp: error: could not listen on {args.host}:{args.port} (in use, or not this machine's address); "
              "choose another --port or --host", file=sys.stderr, flush=True)
        return 1
    return 0


def _serve_until_signal(server, *, on_ready) -> None:
    """Run uvicorn in a thread until SIGINT or SIGTERM, then stop it gracefully: it stops accepting
    and lets requests end (cancelling those still streaming after a few seconds). ``on_ready`` is
    called once it listens.

    uvicorn's own handlers would re-raise the signal once it stops, ending the process before the
    pipeline could end the other stages; in a thread it installs none, and this one decides.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.run, name="torch_pp-http", daemon=True)
    thread.start()
    try:
        announced = False
        while True:
            stopping = not thread.is_alive() or stop.wait(0.05)
            # Checked after the wait too: a stop can come as soon as it listens (a client that saw
            # it answer), and the line saying where it served must still be printed.
            if server.started and not announced:
                on_ready()
                announced = True
            if stopping:
                break
        server.should_exit = True
        thread.join(timeout=15)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
