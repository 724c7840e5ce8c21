"""Fused norms and MLPs of a captured step (``model.fusion``): compiled only where a slot records
(here: where a flag says so), one compile shared by every layer, and a failed compile leaves the
steps unfused.

On CUDA a slot's captured steps use it (``test_graphs`` checks their tokens there); here the
compiled functions run on the CPU, which inductor compiles for too.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from torch_pp.model import fusion

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=100)


def _layers():
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(CONFIG, idx).eval() for idx in range(2)]
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_(0, 0.5)  # norms' weights too: not all ones
    return layers


def _run(layers, hidden):
    rope = LlamaRotaryEmbedding(CONFIG)
    position = torch.arange(hidden.shape[1])[None]
    for layer in layers:
        out = layer(hidden, position_embeddings=rope(hidden, position), position_ids=position)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.inference_mode()
def test_routed_modules_run_compiled_only_while_active_and_compile_once_for_every_layer():
    assert fusion.usable(), fusion._broken  # no earlier compile in this process failed
    torch._dynamo.reset()
    fusion._compiled.clear()
    layers = _layers()
    plain = copy.deepcopy(layers)
    fused_now = []
    assert fusion.prepare(layers, when=lambda: bool(fused_now)) == 2 * 3  # two norms and an MLP per layer
    assert fusion.prepare(layers, when=lambda: True) == 2 * 3  # once per module: routing again changes nothing
    hidden = torch.randn(1, 1, 64)
    # outside a recorded step: transformers' eager modules, bit for bit
    assert torch.equal(_run(layers, hidden), _run(plain, hidden))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fused_now.append(True)
    fused = _run(layers, hidden)
    # one compile per class for both layers (their parameters are inputs, not constants)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2
    assert set(fusion._compiled) == {type(layers[0].mlp), type(layers[0].input_layernorm)}
    torch.testing.assert_close(fused, _run(plain, hidden), rtol=1e-5, atol=1e-5)
    assert fused.abs().sum() > 0
    # every batch size and step length is rows [N, 64] to the compiled functions: N of 1, then one
    # symbolic N for every other (where each shape compiled apart, Qwen3 hit torch's recompile limit)
    for shape in ((2, 1, 64), (1, 3, 64), (2, 5, 64), (3, 7, 64)):
        hidden = torch.randn(shape)
        torch.testing.assert_close(_run(layers, hidden), _run(plain, hidden), rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2 * 2
    fused_now.clear()
    assert torch.equal(_run(layers, hidden), _run(plain, hidden))  # eager again


class _GraphBreakingRMSNorm(nn.Module):
    """A norm inductor cannot compile whole (``fullgraph``): its forward breaks the graph."""

    def forward(self, hidden):
        torch._dynamo.graph_break()
        return hidden * 2


@torch.inference_mode()
def test_a_failed_compile_leaves_steps_unfused_with_one_warning(caplog):
    fusion._compiled.clear()
    layer = nn.Sequential(_GraphBreakingRMSNorm())
    assert fusion.prepare([layer], when=lambda: True) == 1
    try:
        with caplog.at_level(logging.WARNING, logger="torch_pp"):
            assert fusion.warm(lambda: layer(torch.ones(2))) is False
            assert fusion.warm(lambda: layer(torch.ones(2))) is False
        assert not fusion.usable()
        assert sum("run unfused" in r.message for r in caplog.records) == 1
        assert torch.equal(layer(torch.ones(2)), torch.full((2,), 2.0))  # then every routed module runs eagerly
    finally:
        fusion._broken.clear()
        fusion._compiled.clear()
