"""Run under torchrun by bench_decode.py: the floor, a bare pipeline with nothing of torch_pp's.

Every rank loads the model with transformers and keeps the layers of its range (the plan
torch_pp chose, passed in). Rank 0 runs transformers' own generate(); its layer list ends in a
``Remote`` that sends the hidden state, the rotary cos/sin and the mask (one float32 tensor)
round the ring over plain ``torch.distributed`` Gloo (one message per hop, as torch_pp sends)
and returns what comes back. The other ranks run their layers on what arrives. No framing
beyond a length, no checks, liveness or threads: what any pipeline of these layers in separate
processes pays on this machine, so that bench_decode can tell the machine's cost from
torch_pp's own. Llama-like models (``model.model.layers``, rotary position embeddings); one
sequence at a time; the whole model's memory on every rank (a benchmark for models that fit
one machine); bench_decode passes the plan torch_pp chose.

    _bare_pipeline.py MODEL_DIR PROMPT NEW_TOKENS PLAN
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_tokenizer, make_inputs, serve_turns, timed_generate  # noqa: E402

from torch_pp.model.stage import cache_keyword  # noqa: E402
from torch_pp.placement.plan import parse_layers  # noqa: E402

model_dir, prompt, new_tokens, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
DEVICE, DTYPE = os.environ.get("BENCH_DEVICE", "cpu"), getattr(torch, os.environ.get("BENCH_DTYPE", "float32"))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
nxt, prev = (rank + 1) % world, (rank - 1) % world

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(DEVICE).eval()
config = model.config
plan = parse_layers(spec, num_layers=config.num_hidden_layers)
plan.check_world_size(world)
start, end = plan.ranges[rank]
own = list(model.model.layers)[start:end]
HIDDEN = config.hidden_size
HEAD_DIM = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
HEADER = 2  # sequence length (0 ends the run), mask elements (0: no mask)
FRAME = HEADER + HIDDEN + 2 * HEAD_DIM  # a decode step's message


def pack(hidden, cos, sin, mask) -> torch.Tensor:
    """One contiguous float32 CPU tensor: hidden state, cos, sin, mask (a batch of one)."""
    parts = [hidden.reshape(-1), cos.reshape(-1), sin.reshape(-1)] + ([] if mask is None else [mask.reshape(-1)])
    return torch.cat([p.to(torch.float32) for p in parts]).cpu()


def unpack(body: torch.Tensor, seq: int, mask_len: int):
    body = body.to(DEVICE)
    n_h, n_r = seq * HIDDEN, seq * HEAD_DIM
    hidden = body[:n_h].view(1, seq, HIDDEN).to(DTYPE)
    cos = body[n_h:n_h + n_r].view(1, seq, HEAD_DIM).to(DTYPE)
    sin = body[n_h + n_r:n_h + 2 * n_r].view(1, seq, HEAD_DIM).to(DTYPE)
    mask = body[n_h + 2 * n_r:].view(1, 1, seq, -1).bool() if mask_len else None
    return hidden, cos, sin, mask


def send(body: torch.Tensor, seq: int, mask_len: int, dst: int) -> None:
    """One frame (header and a decode step's body, as torch_pp sends), then any rest: a Gloo send
    waits for the peer's receive, so a second message per hop would cost a second handshake."""
    flat = torch.cat([torch.tensor([seq, mask_len], dtype=torch.float32), body])
    dist.send(torch.nn.functional.pad(flat[:FRAME], (0, max(0, FRAME - flat.numel()))), dst)
    if flat.numel() > FRAME:
        dist.send(flat[FRAME:].contiguous(), dst)


def recv(src: int) -> tuple[torch.Tensor | None, int, int]:
    frame = torch.empty(FRAME)
    dist.recv(frame, src)
    seq, mask_len = int(frame[0]), int(frame[1])
    size = seq * (HIDDEN + 2 * HEAD_DIM) + mask_len
    if HEADER + size <= FRAME:
        return frame[HEADER:HEADER + size], seq, mask_len
    rest = torch.empty(HEADER + size - FRAME)
    dist.recv(rest, src)
    return torch.cat([frame[HEADER:], rest]), seq, mask_len


class Remote(nn.Module):
    """Rank 0's stand-in for the other ranks' layers."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        cos, sin = position_embeddings
        seq = hidden_states.shape[1]
        send(pack(hidden_states, cos, sin, attention_mask), seq, 0 if attention_mask is None else attention_mask.numel(), nxt)
        body, _, _ = recv(prev)
        return unpack(body, seq, 0)[0]


if rank == 0:
    model.model.layers = nn.ModuleList([*own, Remote()])
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(load_tokenizer(model_dir), prompt).items()}
    timed_generate(model, inputs, new_tokens=4)  # warm-up

    def finish() -> dict:
        send(torch.zeros(0), 0, 0, nxt)  # sequence length 0: the other ranks end
        return {"plan": spec}

    serve_turns(lambda spec=None: timed_generate(model, inputs, new_tokens=(spec or {}).get("new_tokens", new_tokens)), finish)
else:
    cache, keyword = None, cache_keyword(own[0])
    with torch.inference_mode():
        while True:
            body, seq, mask_len = recv(prev)
            if not seq:
                if nxt != 0:
                    send(torch.zeros(0), 0, 0, nxt)
                break
            hidden, cos, sin, mask = unpack(body, seq, mask_len)
            if seq > 1:  # a prompt: a new sequence
                cache = DynamicCache(config=config)
            past = cache.get_seq_length(start)
            positions = torch.arange(past, past + seq, device=DEVICE).unsqueeze(0)
            for layer in own:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions,
                               use_cache=True, **{keyword: cache})
            # The last rank sends no mask back (rank 0 has its own; it takes only the hidden state).
            send(pack(hidden, cos, sin, None if nxt == 0 else mask), seq, 0 if nxt == 0 or mask is None else mask_len, nxt)
dist.destroy_process_group()
