"""The architecture registry: refusals by behaviour, with their reasons, before any weight is read;
and the documented list of families (docs/architectures.md) is the registry's."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ROOT
from torch_pp import archs
from torch_pp.errors import ModelFolderError


def test_readme_lists_the_registry():
    section = (ROOT / "docs" / "architectures.md").read_text()
    assert "docs/architectures.md" in (ROOT / "README.md").read_text()
    rows = {m.group(1): {t.strip() for t in m.group(2).split(",")}
            for m in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \| [^|]+ \|$", section, re.M) if m.group(1) not in ("family", "---")}
    assert rows == {f.name: set(f.model_types) for f in archs.FAMILIES}
    for refusal in archs.REFUSALS:
        assert f"**{refusal.what}**" in section, refusal.what
    assert "**a model whose decoder layers are not `model.layers`**" in section


@pytest.mark.parametrize("model_type, fields, names", [
    ("qwen3_next", {}, "linear_attention"),
    ("jamba", {}, "mamba_d_state"),
    ("lfm2", {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"]}, "conv"),
])
def test_layers_with_another_state_are_refused_by_name(model_type, fields, names):
    config = AutoConfig.for_model(model_type, **fields)
    with pytest.raises(ModelFolderError, match=rf"model_type '{model_type}' .* not a key/value cache .*{names}|"
                                                rf"model_type '{model_type}' .*{names}.*"):
        archs.check_config(config, where="config.json")


def test_a_multimodal_config_is_refused():
    config = AutoConfig.for_model("gemma3")
    with pytest.raises(ModelFolderError, match="model_type 'gemma3' in config.json is a multimodal model.*gemma3_text"):
        archs.check_config(config, where="config.json")


def test_a_model_not_laid_out_as_model_layers_is_refused():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelFolderError, match=r"model_type 'gpt2' \(GPT2LMHeadModel\) has no model: .*model\.layers"):
        archs.check_layout(model, model_type="gpt2")


def test_an_encoder_model_type_is_not_a_causal_lm():
    with pytest.raises(ModelFolderError, match="model_type 't5' .* not a causal language model"):
        archs.check_config(AutoConfig.for_model("t5"), where="config.json")


@pytest.mark.parametrize("model_type", sorted({t for f in archs.FAMILIES for t in f.model_types}))
def test_every_tested_family_passes_the_checks(model_type):
    config = AutoConfig.for_model(model_type)
    archs.check_config(config, where="config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    archs.check_layout(model, model_type=model_type)
