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


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gemma3_text"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_stage_reads_only_its_tensors_through_the_conversion(tmp_path, arch, rank):
    """Each stage converts (e.g. fuses experts) only its own checkpoint tensors, and gets exactly
    the parameters transformers' from_pretrained builds."""
    import re
    from unittest import mock

    from transformers import AutoModelForCausalLM

    from torch_pp.model import loading

    folder = write_tiny_model(arch, tmp_path / arch, sharded=True)
    plan = even_plan(num_layers=4, num_stages=2)
    read_keys = []
    original = loading.SafetensorsReader.read

    def recording(self, key):
        read_keys.append(key)
        return original(self, key)

    with mock.patch.object(loading.SafetensorsReader, "read", recording):
        stage = loading.load_stage(folder, plan=plan, rank=rank, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    layers = {int(m.group(1)) for k in read_keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    assert layers == set(plan.layers_of(rank))
    outside = [k for k in read_keys if not k.startswith("model.layers.")]
    assert (outside != []) == (rank == 0), outside  # embedding, norm, head: rank 0's alone
    assert len(read_keys) == len(set(read_keys)), "a tensor was read twice"
    ref = dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())
    mine = dict(stage.model.named_parameters())
    assert mine and all(torch.equal(p, ref[n]) for n, p in mine.items())
    owned = {n for n in ref if not n.startswith("model.layers.") or int(n.split(".")[2]) in plan.layers_of(rank)}
    assert set(mine) == (owned if rank == 0 else {n for n in owned if n.startswith("model.layers.")})
