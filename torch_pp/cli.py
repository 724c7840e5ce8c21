"""Command line: ``python -m torch_pp <command>``, under torchrun for several stages.

Only rank 0 writes to stdout. Errors end every rank with a non-zero exit and one
message from rank 0 (other ranks add a line only for what rank 0 cannot know).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from .net.liveness import watch_launcher
from .options import BALANCES, DTYPE_NAMES, QUANTIZE_MODES, OptionsError, Settings, StartOptions, check_generation_args, parse_bytes
from .placement.plan import PlanError, check_stage_count


def _add_start_options(p: argparse.ArgumentParser) -> None:
    """What ``generate`` and ``serve`` share: the model, its placement, device, dtype and quantization."""
    p.add_argument("--model", help="Hugging Face model folder; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES))
    p.add_argument("--device", help="mps, cuda, cuda:N or cpu; default: best available")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="int8 or int4: each stage quantizes its decoder layers' linear weights as it loads them")
    p.add_argument("--layers", help="manual plan, one START:END per rank, e.g. 0:10,10:30")
    p.add_argument("--balance", choices=BALANCES, default="auto",
                   help="auto (default): as measured on these machines at an earlier run of this model, if that "
                        "placement fits, else by memory; memory: by each rank's free memory; compute: by work per "
                        "token; even: equal layer counts")
    p.add_argument("--context", type=int, default=4096, help="tokens the KV cache is sized for when placing layers")
    p.add_argument("--max-memory", help="memory this rank may use, e.g. 96GiB (default: what the device reports)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture every stage's decode steps (rank 0's own layers too) as CUDA graphs over caches "
                        "preallocated for --context tokens (default: on for CUDA stages of the models that allow it)")
    p.add_argument("--split-head", action=argparse.BooleanOptionalAction, default=None,
                   help="split the LM head's rows between rank 0 and the last stage, which multiply them at once "
                        "(default: where rank 0 and the last stage are CPUs and the head is large)")
    p.add_argument("--draft-model", help="Hugging Face folder of a small model of the same tokenizer, loaded on rank 0 only: "
                                        "speculative decoding of one stream (proposals verified several tokens a step)")
    p.add_argument("--prompt-lookup", type=int, metavar="K",
                   help="speculative decoding without a second model: propose up to K tokens found after the last "
                        "n-gram's earlier occurrence in the prompt or the text so far (pays for summaries, edits, code)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch_pp", description="Pipeline-parallel LLM inference over Gloo.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt (run under torchrun for several stages)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--min-new-tokens", type=int, default=0, help="do not stop at end-of-sequence before this many")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--seed", type=int, default=0)
    _add_start_options(gen)
    gen.add_argument("--output", choices=["text", "json"], default="text")
    srv = sub.add_parser("serve", help="serve an OpenAI-compatible API on rank 0 (run under torchrun for several stages)")
    _add_start_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    srv.add_argument("--max-concurrent", type=int, default=8, help="requests generating at once")
    srv.add_argument("--batches", default="auto",
                     help="running batches requests join (continuous batching): auto (1, or 2 where they measure faster "
                          "at start-up), a number, or 0 for one generate() per request in its own lane")
    srv.add_argument("--max-queue", type=int, default=16, help="requests waiting for a slot; more get HTTP 429")
    srv.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name)")
    wk = sub.add_parser("worker", help="serve one stage for a driver process (a notebook): see torch_pp.interactive")
    wk.add_argument("--driver", required=True, help="the driver's address:port")
    wk.add_argument("--rank", type=int, required=True, help="this stage's rank, 1 .. stages-1")
    wk.add_argument("--stages", type=int, required=True, help="number of stages, the driver included")
    wk.add_argument("--local-rank", type=int, default=0)
    pl = sub.add_parser("plan", help="preview a placement from a model folder or config.json: no torchrun, no weights")
    pl.add_argument("model", help="model folder or its config.json")
    pl.add_argument("--memory", required=True, help="usable memory per node, e.g. 128GiB,192GiB (on Macs about 75%% of RAM)")
    pl.add_argument("--dtype", default="float16", help="float32, float16, bfloat16, int8/8bit or int4/4bit (default float16)")
    pl.add_argument("--quantize", choices=QUANTIZE_MODES, help="count the layers' linear weights quantized (with --dtype "
                    "the compute dtype, as in generate)")
    pl.add_argument("--context", type=int, default=4096)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--balance", choices=BALANCES, default="auto",
                    help="auto: as a run places without a measurement of the machines (by memory)")
    pl.add_argument("--layers", help="manual plan to check instead")
    pl.add_argument("--split-head", action="store_true",
                    help="count the LM head split between rank 0 and the last stage (as a run on CPUs does by default)")
    pl.add_argument("--draft-model", help="count a draft model for speculative decoding on rank 0 (its folder or config.json)")
    pl.add_argument("--reserve", default="1GiB", help="runtime overhead per node (default 1GiB)")
    pl.add_argument("--output", choices=["text", "json"], default="text")
    doc = sub.add_parser("doctor", help="check every machine and measure every link (run under torchrun like generate)")
    doc.add_argument("--model", help="size the latency probe like this model's hidden state")
    doc.add_argument("--device", help="device to report (default: best available)")
    doc.add_argument("--message-bytes", type=int, default=16384, help="latency probe size (default: a 8192-wide fp16 hidden state)")
    doc.add_argument("--expect-gbit", type=float, help="warn when a link gives well under this bandwidth")
    doc.add_argument("--quantize", choices=QUANTIZE_MODES, help="also check that every rank's device runs this quantization")
    doc.add_argument("--dtype", choices=list(DTYPE_NAMES), help="compute dtype for --quantize's check (default: the device's)")
    doc.add_argument("--output", choices=["text", "json"], default="text")
    return parser


def run_plan(args: argparse.Namespace) -> int:
    """``torch_pp plan``: exit 0 if the model fits, 3 if it does not."""
    import dataclasses
    from pathlib import Path

    from .placement.config import load_config_only
    from .placement.balance import choose_plan
    from .placement.sizing import (BYTES_PER_PARAM, format_bytes, head_split, model_sizes, needs_table,
                                   stage_needs)

    if args.dtype not in BYTES_PER_PARAM:
        raise OptionsError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(BYTES_PER_PARAM)}")
    config, checkpoint_bytes = load_config_only(Path(args.model))
    memory = [parse_bytes(m) for m in args.memory.split(",")]
    reserve = parse_bytes(args.reserve)
    sizes = head_split(model_sizes(config), num_stages=len(memory), dtype=args.dtype, devices=["cpu"] * len(memory),
                       wanted=args.split_head)
    if args.draft_model:
        sizes = dataclasses.replace(sizes, draft=model_sizes(load_config_only(Path(args.draft_model))[0]))
    plan = choose_plan(sizes, num_stages=len(memory), layers=args.layers, balance=args.balance, available=memory,
                       dtype=args.dtype, context=args.context, batch=args.batch, reserve=reserve, quantize=args.quantize)
    needs = stage_needs(sizes, plan, dtype=args.dtype, context=args.context, batch=args.batch, available=memory, reserve=reserve,
                        quantize=args.quantize)
    fits = all(s.fits for s in needs)
    params = sum(sizes.layer_params) + sizes.rank0_params
    if args.output == "json":
        print(json.dumps({
            "model_type": config.model_type, "parameters": params, "dtype": args.dtype, "context": args.context,
            "batch": args.batch, "checkpoint_bytes": checkpoint_bytes, "fits": fits,
            "stages": [{"rank": s.rank, "layers": list(s.layers), "weight_bytes": s.weight_bytes, "kv_bytes": s.kv_bytes,
                        "reserve_bytes": s.reserve_bytes, "total_bytes": s.total_bytes, "available_bytes": s.available_bytes,
                        "headroom_bytes": s.headroom_bytes, "fits": s.fits} for s in needs],
        }))
    else:
        print(f"{config.model_type}: {params / 1e9:.2f} B parameters, {config.num_hidden_layers} layers, {args.dtype}, context {args.context} x batch {args.batch}"
              + (f"; checkpoint {format_bytes(checkpoint_bytes)}" if checkpoint_bytes else ""))
        print(needs_table(needs))
        print("fits: yes" if fits else "fits: NO - the stages marked NO need more memory")
    return 0 if fits else 3


def run_doctor(args: argparse.Namespace, transport) -> int:
    from .net import doctor

    size = args.message_bytes
    if args.model:
        from .placement.config import read_config

        size = read_config(args.model).hidden_size * 2
    report, _, problems = doctor.run(transport, device=args.device, message_bytes=size, expect_gbit=args.expect_gbit,
                                     quantize_check=_quantize_check(args.quantize, args.dtype) if args.quantize else None)
    if transport.rank == 0:
        print(json.dumps(report) if args.output == "json" else doctor.format_report(report), flush=True)
    return 1 if problems else 0


def _quantize_check(mode: str, dtype: str | None):
    """For ``doctor --quantize``: tries the quantized multiply on a rank's device (see ``model.quant``)."""
    import torch

    from .devices import default_dtype, supported_dtypes
    from .errors import DeviceError
    from .model.quant import check_supported

    def check(device) -> dict:
        name = dtype or default_dtype(device.type, None, supported_dtypes(device))
        try:
            check_supported(mode, device=device, dtype=getattr(torch, name))
        except DeviceError as exc:
            return {"mode": mode, "dtype": name, "refused": str(exc)}
        return {"mode": mode, "dtype": name, "refused": None}

    return check


def _quiet_worker(rank: int) -> None:
    """Ranks other than 0 keep stdout clean and log only what matters, with their rank."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(message)s", stream=sys.stderr)
    if rank != 0:
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
    if Settings.from_env().debug:
        logging.getLogger("torch_pp").setLevel(logging.DEBUG)


def start_options(args: argparse.Namespace) -> StartOptions:
    """The start options of ``generate`` or ``serve``, checked with the command's own arguments
    before anything starts.

    Raises:
        OptionsError: for an option out of range.
    """
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise OptionsError(f"--prompt-lookup {args.prompt_lookup} is out of range: it must be a whole number >= 1")
    if args.prompt_lookup and args.draft_model:
        raise OptionsError("--prompt-lookup and --draft-model are two ways to propose tokens: give one of them")
    if args.command == "generate":
        check_generation_args(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.min_new_tokens)
    else:
        if args.max_concurrent < 1 or args.max_queue < 0:
            raise OptionsError(f"--max-concurrent must be at least 1 and --max-queue at least 0, "
                               f"got {args.max_concurrent} and {args.max_queue}")
        if args.batches != "auto" and not (args.batches.isdigit() and int(args.batches) <= 8):
            raise OptionsError(f"--batches {args.batches} is out of range: it must be auto or a whole number in 0..8")
        if not 0 < args.port < 65536:
            raise OptionsError(f"--port {args.port} is out of range: it must be in 1..65535")
    return StartOptions(model=args.model, layers=args.layers, balance=args.balance, context=args.context,
                        max_memory=parse_bytes(args.max_memory) if args.max_memory else None,
                        device=args.device, dtype=args.dtype, progress=not args.no_progress, quantize=args.quantize,
                        graphs=args.graphs, split_head=args.split_head, draft_model=args.draft_model)


def preflight(options: StartOptions, world_size: int) -> None:
    """Checks that need only the command line and config.json: seconds before torch is even imported.

    Whatever cannot be read here is left to ``start()``, which reports it from every rank.

    Raises:
        PlanError: for more stages than the model has layers.
    """
    if options.model is None or options.layers:
        return
    from pathlib import Path

    from .errors import TorchPPError
    from .placement.config import config_dict

    try:
        layers = int(config_dict(Path(options.model) / "config.json")["num_hidden_layers"])
    except (TorchPPError, KeyError, TypeError, ValueError):  # start() reports a bad folder in full, from every rank
        return
    check_stage_count(world_size, layers)


def run_generate(args: argparse.Namespace, options: StartOptions, transport) -> int:
    import torch
    from transformers import TextStreamer, set_seed

    from .streamers import Streamers, TokenTimer
    from .pipeline import start

    pipe = start(options=options, transport=transport)
    if not pipe.is_driver:
        return 0
    with pipe:
        tokenizer = pipe.tokenizer()
        if args.chat:
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = tokenizer(args.prompt, return_tensors="pt")
        inputs = {k: v.to(pipe.device) for k, v in inputs.items()}
        sampling = {
            k: v for k, v in {
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "repetition_penalty": args.repetition_penalty,
            }.items() if v is not None
        }
        set_seed(args.seed)
        timer = TokenTimer()
        text_out = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.output == "text" else None
        with torch.inference_mode():
            out = pipe.model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                streamer=Streamers(timer, text_out), **sampling,
                **({"prompt_lookup_num_tokens": args.prompt_lookup} if args.prompt_lookup else {}),
            )
        prompt_len = inputs["input_ids"].shape[1]
        new_ids = out[0, prompt_len:].tolist()
        stages = pipe.stats()
        result = {
            "text": tokenizer.decode(new_ids, skip_special_tokens=True),
            "token_ids": new_ids,
            "prompt_tokens": prompt_len,
            "ttft_s": timer.ttft_s,
            "decode_tokens_per_s": timer.decode_tokens_per_s,
            "placement": {"layers": pipe.plan.spec(), "by": pipe.placed_by},
            "speculation": stages[0].get("speculation"),
            "stages": [
                {k: s[k] for k in ("rank", "host", "layers", "device", "dtype", "peak_memory_bytes", "weight_bytes",
                                   "head_rows") if k in s}
                for s in stages
            ],
        }
    if args.output == "json":
        print(json.dumps(result), flush=True)
    else:
        tps, spec = result["decode_tokens_per_s"], result["speculation"]
        accepted = (f"; speculation: {spec['accepted']} of {spec['proposed']} proposed tokens accepted"
                    if spec and spec["calls"] else "")
        print(
            f"[{len(new_ids)} tokens; time to first token {result['ttft_s'] or 0:.3f} s; "
            f"decode {tps or 0:.1f} tokens/s; {len(stages)} stage(s), layers {result['placement']['layers']} "
            f"by {result['placement']['by']}{accepted}]",
            file=sys.stderr,
        )
    return 0


def _reports(rank: int) -> bool:
    """Whether this rank prints a start-up error: rank 0, and the first rank of every other machine
    (so that whoever looks at that machine's terminal sees why it stopped)."""
    return rank == 0 or (os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("GROUP_RANK", "0") != "0")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m torch_pp``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    watch_launcher(rank=rank)
    prefix = "torch_pp: error: " if rank == 0 else f"torch_pp: rank {rank}: "
    serving = args.command == "serve"
    if args.command in ("generate", "serve"):
        try:  # every rank checks the same command line: one message, and no process group formed
            options = start_options(args)
            preflight(options, int(os.environ.get("WORLD_SIZE", "1")))
        except (OptionsError, PlanError) as exc:
            if _reports(rank):
                print(f"{prefix}{exc}", file=sys.stderr, flush=True)
            else:  # torchrun stops every rank when the first one exits: let the reporting rank's line out first
                time.sleep(1.0)
            return 1
    _quiet_worker(rank)
    from .errors import PipelineError, StartupError, TorchPPError, TransportError
    from .net.machine import same_machine
    from .net.transport import Transport

    transport = None
    try:
        if args.command == "plan":
            return run_plan(args)
        if args.command == "worker":
            from .interactive import worker_main

            return worker_main(driver=args.driver, rank=args.rank, stages=args.stages, local_rank=args.local_rank)
        # A server's rank 0 leaves SIGINT/SIGTERM to the HTTP server (which then ends every stage
        # cleanly) and answers 503 when a stage is lost instead of ending.
        transport = Transport.from_env(handle_signals=not (serving and rank == 0), exit_on_loss=not (serving and rank == 0))
        if args.command == "generate":
            return run_generate(args, options, transport)
        if serving:
            from .api.server import run_serve

            return run_serve(args, options, transport)
        if args.command == "doctor":
            return run_doctor(args, transport)
    except StartupError as exc:
        # Every rank got the same error: rank 0 says it, and the first rank of each other machine too.
        other_machine = (transport is not None and transport.local_rank == 0
                         and not same_machine(transport.hellos[transport.rank], transport.hellos[0]))
        if rank == 0 or other_machine:
            print(f"torch_pp: error: {exc}", file=sys.stderr)
        return 1
    except (PipelineError, TransportError) as exc:
        if isinstance(exc, TransportError) and transport is not None and transport.monitor is not None:
            # A peer probably died: let the liveness monitor name the lost stage (it ends the process).
            transport.monitor.await_verdict()
        print(f"{prefix}{exc}", file=sys.stderr)
        return 1
    except TorchPPError as exc:  # ours, with a message for people; anything else is a bug: its traceback shows
        print(f"{prefix}{exc}", file=sys.stderr)
        return 1
    finally:
        if transport is not None:
            transport.close()
    return 2
