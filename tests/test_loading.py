"""Loading details: dtype cast at load time, and device/dtype checks."""

import pytest
import torch

from tiny_models import write_tiny_model
from torch_pp.devices import DeviceError, pick_dtype
from torch_pp.model.loading import load_stage
from torch_pp.placement.plan import even_plan


def test_bf16_checkpoint_loads_as_fp16(tmp_path):
    folder = write_tiny_model("llama", tmp_path / "m")
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    stage = load_stage(tmp_path / "bf16", plan=even_plan(num_layers=4, num_stages=1), rank=0,
                       device=torch.device("cpu"), dtype=torch.float16, progress=False)
    params = dict(stage.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float16}
    want = bf16.state_dict()["model.layers.2.mlp.up_proj.weight"].to(torch.float16)
    assert torch.equal(params["model.layers.2.mlp.up_proj.weight"], want)
    # the rotary buffers are rebuilt in float32, as transformers keeps them
    assert stage.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_unsupported_dtypes_are_refused():
    with pytest.raises(DeviceError, match="unsupported dtype 'float64'"):
        pick_dtype("float64", torch.device("cpu"))
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
