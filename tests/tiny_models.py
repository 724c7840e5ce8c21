"""Tiny random-weight models written by the tests themselves (hidden 64, 4 layers)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

VOCAB = 256
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "deepseek_v3", "phi3", "gemma", "gemma2", "gemma3_text",
         "mixtral", "qwen2_moe", "qwen3_moe")


def tiny_config(arch: str, *, layers: int = 4):
    from transformers import AutoConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "mistral":
        common["sliding_window"] = 16  # small enough that the window matters in the tests
    if arch == "qwen2":
        common.update(use_sliding_window=True, sliding_window=16, max_window_layers=2, tie_word_embeddings=True)
    if arch == "qwen3":
        common["head_dim"] = 32
    if arch == "deepseek_v3":
        common.update(
            num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
        )
    if arch in ("gemma", "gemma2", "gemma3_text"):
        common["head_dim"] = 16
    if arch in ("gemma2", "gemma3_text"):
        common.update(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    if arch == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch in ("qwen2_moe", "qwen3_moe"):
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    if arch == "qwen2_moe":
        common["shared_expert_intermediate_size"] = 48
    if arch == "qwen3_moe":
        common["head_dim"] = 16
    return AutoConfig.for_model(arch, **common)


# Size fields a tiny model of any family sets, where its config has them.
_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=512, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=48,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=16,
    first_k_dense_replace=1, n_group=2, topk_group=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, rotary_dim=8,
)


def sweep_config(model_type: str):
    """A tiny config of ``model_type``: its defaults with the common size fields shrunk (for the sweep).

    Raises whatever transformers raises when it cannot build one.
    """
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in _TINY.items() if hasattr(base, k)}
    if getattr(base, "qk_rope_head_dim", None):  # MLA: the head size follows the rope and nope parts
        fields.pop("head_dim", None)
    types = getattr(base, "layer_types", None)
    if types:  # keep the family's own pattern, cut to the tiny depth
        fields["layer_types"] = list(types[: fields.get("num_hidden_layers", len(types))])
    try:
        return AutoConfig.for_model(model_type, **fields)
    except AttributeError:  # layer_types derived by a property: let the family derive it again
        fields.pop("layer_types", None)
        return AutoConfig.for_model(model_type, **fields)


def write_tiny_model(arch: str, path: Path, *, sharded: bool = False, seed: int = 0, layers: int = 4) -> Path:
    """Write a random-weight model folder (config, safetensors, generation config)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers=layers), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init, so tokens vary
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(path, max_shard_size="60KB" if sharded else "10GB")
    return path
