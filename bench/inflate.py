"""A real small llama checkpoint grown to a large model's shape, computing the very same function.

    python bench/inflate.py SRC OUT [--shape 8b] [--device cuda]

Why: a speculative decoding benchmark needs two things no random-weight model gives at once,
the cost of a large model's step (reading its weights) and a real model's predictions (which
proposals it accepts). A real 8B checkpoint cannot travel to the GPU machine; a 135M one can.
This writes a checkpoint with ``shape``'s layers (``gpu_report.SHAPES``: every matrix the large
model reads per token, so a step costs what the large model's step costs) whose output is the
small model's: the small model's weights sit in a corner of each matrix, everything else is
zero, and the few rescalings that keep the arithmetic equal are exact:

- hidden dimensions beyond the source's stay zero through every layer (no weight writes them);
  an RMS norm then averages over more dimensions, so its weight scales by sqrt(h/H) and its
  epsilon by h/H, which gives the source's normalised values exactly;
- a head of D dimensions holds a source head of d: rotary pairs (i, i + d/2) turn at frequency
  theta^(-2i/d), which in D dimensions is the pair (i*D/d, i*D/d + D/2); attention scales by
  1/sqrt(D), so the query weights scale by sqrt(D/d);
- grouped heads: source query head j*g + t (g per key/value head) becomes j*G + t; the other
  query heads are zero and their output columns too;
- the MLP's extra columns are zero (silu(0) * 0 = 0), layers beyond the source's count add zero
  (their output projections are zero), and the vocabulary stays the source's (its tokenizer).

Only plain llama checkpoints (default rotary, no biases, silu) are grown; anything else refuses.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _check(src, big) -> None:
    rope = getattr(src, "rope_parameters", None) or {"rope_type": "default"}
    problems = [
        f"model_type {src.model_type} is not llama" if src.model_type != "llama" else "",
        "biases" if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False) else "",
        f"rotary {rope.get('rope_type')}" if rope.get("rope_type", "default") != "default" else "",
        f"activation {src.hidden_act}" if src.hidden_act != "silu" else "",
    ]
    d, D = _head_dim(src), _head_dim(big)
    g, G = src.num_attention_heads // src.num_key_value_heads, big.num_attention_heads // big.num_key_value_heads
    for what, small, large in (("hidden size", src.hidden_size, big.hidden_size),
                               ("intermediate size", src.intermediate_size, big.intermediate_size),
                               ("layers", src.num_hidden_layers, big.num_hidden_layers),
                               ("key/value heads", src.num_key_value_heads, big.num_key_value_heads),
                               ("query heads per key/value head", g, G), ("head dimensions", d, D)):
        if large < small:
            problems.append(f"{what} {large} < the source's {small}")
    if D % d:
        problems.append(f"head dimensions {D} not a multiple of the source's {d}")
    problems = [p for p in problems if p]
    if problems:
        raise SystemExit("cannot grow this checkpoint: " + "; ".join(problems))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def grown_config(src, shape):
    """``shape``'s config (a name of ``gpu_report.SHAPES``, or its ``(model_type, fields)``) with the
    source's vocabulary, rotary base and special tokens."""
    from transformers import AutoConfig

    from gpu_report import SHAPES

    model_type, fields = SHAPES[shape] if isinstance(shape, str) else shape
    fields = {**fields, "vocab_size": src.vocab_size, "tie_word_embeddings": False,
              "max_position_embeddings": src.max_position_embeddings,
              "rope_theta": (getattr(src, "rope_parameters", None) or {}).get("rope_theta",
                                                                              getattr(src, "rope_theta", 10000.0)),
              "rms_norm_eps": src.rms_norm_eps * src.hidden_size / fields["hidden_size"],
              **{k: getattr(src, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    return AutoConfig.for_model(model_type, **fields, dtype="bfloat16")


def grow(src_dir: Path, out: Path, *, shape="8b", device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Write ``src_dir``'s model grown to ``shape`` (see ``grown_config``) into ``out`` (sharded
    safetensors, ``dtype``); returns ``out``."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    src = AutoConfig.from_pretrained(src_dir)
    big = grown_config(src, shape)
    _check(src, big)
    weights = {}
    for f in sorted(src_dir.glob("*.safetensors")):
        weights.update(load_file(str(f), device=device))
    weights = {k: v.float() for k, v in weights.items()}
    h, H = src.hidden_size, big.hidden_size
    d, D = _head_dim(src), _head_dim(big)
    k_heads, K = src.num_key_value_heads, big.num_key_value_heads
    g, G = src.num_attention_heads // k_heads, big.num_attention_heads // K
    r = D // d
    # A source head's dimension i goes to i*r (first half of the rotary pairs) or (i - d/2)*r + D/2.
    place = torch.tensor([i * r if i < d // 2 else (i - d // 2) * r + D // 2 for i in range(d)], device=device)
    norm_scale = math.sqrt(h / H)
    out_dtype = getattr(torch, dtype)

    def zeros(*shape_):
        return torch.zeros(*shape_, device=device)

    def heads(w: torch.Tensor, n_src: int, n_big: int, index, rotary: bool) -> torch.Tensor:
        """[n_src*d, h] projection rows into [n_big*D, H], source head j at ``index(j)``."""
        grown = zeros(n_big * D, H)
        for j in range(n_src):
            rows = index(j) * D + (place if rotary else torch.arange(d, device=device))
            grown[rows, :h] = w[j * d:(j + 1) * d]
        return grown

    def q_index(j: int) -> int:
        return (j // g) * G + j % g

    def norm(w: torch.Tensor) -> torch.Tensor:
        grown = zeros(H)
        grown[:h] = w * norm_scale
        return grown

    tensors = {}
    embed = zeros(src.vocab_size, H)
    embed[:, :h] = weights["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embed
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    grown_head = zeros(src.vocab_size, H)
    grown_head[:, :h] = head
    tensors["lm_head.weight"] = grown_head
    tensors["model.norm.weight"] = norm(weights["model.norm.weight"])
    for layer in range(big.num_hidden_layers):
        p = f"model.layers.{layer}."
        if layer < src.num_hidden_layers:
            w = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}
            o = zeros(H, big.num_attention_heads * D)
            for j in range(src.num_attention_heads):
                columns = q_index(j) * D + torch.arange(d, device=device)
                o[:h, columns] = w["self_attn.o_proj.weight"][:, j * d:(j + 1) * d]
            mlp_i, I = src.intermediate_size, big.intermediate_size
            gate, up, down = zeros(I, H), zeros(I, H), zeros(H, I)
            gate[:mlp_i, :h], up[:mlp_i, :h] = w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]
            down[:h, :mlp_i] = w["mlp.down_proj.weight"]
            layer_tensors = {
                "self_attn.q_proj.weight": heads(w["self_attn.q_proj.weight"], src.num_attention_heads,
                                                 big.num_attention_heads, q_index, True) * math.sqrt(r),
                "self_attn.k_proj.weight": heads(w["self_attn.k_proj.weight"], k_heads, K, lambda j: j, True),
                "self_attn.v_proj.weight": heads(w["self_attn.v_proj.weight"], k_heads, K, lambda j: j, False),
                "self_attn.o_proj.weight": o, "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
                "mlp.down_proj.weight": down, "input_layernorm.weight": norm(w["input_layernorm.weight"]),
                "post_attention_layernorm.weight": norm(w["post_attention_layernorm.weight"])}
        else:  # adds zero to the residual stream: its output projections are zero
            I, ones = big.intermediate_size, torch.ones(h, device=device)
            layer_tensors = {
                "self_attn.q_proj.weight": zeros(big.num_attention_heads * D, H),
                "self_attn.k_proj.weight": zeros(K * D, H), "self_attn.v_proj.weight": zeros(K * D, H),
                "self_attn.o_proj.weight": zeros(H, big.num_attention_heads * D),
                "mlp.gate_proj.weight": zeros(I, H), "mlp.up_proj.weight": zeros(I, H), "mlp.down_proj.weight": zeros(H, I),
                "input_layernorm.weight": norm(ones), "post_attention_layernorm.weight": norm(ones)}
        tensors.update({p + k: v for k, v in layer_tensors.items()})
    out.mkdir(parents=True, exist_ok=True)
    index, shard, size = {}, {}, 0
    for name in list(tensors):
        shard[name] = tensors.pop(name).to(out_dtype).cpu().contiguous()
        size += shard[name].nbytes
        if size > 4 * 2**30 or not tensors:
            file = f"model-{len(set(index.values())):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index.update({k: file for k in shard})
            shard, size = {}, 0
    total = sum((out / f).stat().st_size for f in set(index.values()))
    index_json = {"metadata": {"total_size": total}, "weight_map": index}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json))
    big.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy(src_dir / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a llama checkpoint folder (safetensors)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="8b", help="a shape of gpu_report.SHAPES")
    ap.add_argument("--device", default="cpu", help="where to build the tensors")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    grow(args.src, args.out, shape=args.shape, device=args.device, dtype=args.dtype)
    print(json.dumps({"out": str(args.out), "bytes": sum(f.stat().st_size for f in args.out.glob("*.safetensors"))}))


if __name__ == "__main__":
    main()
