"""Loading details: dtype cast at load time, and device/dtype checks."""

import pytest
import torch
from torch.nn import functional as F

from tiny_models import write_tiny_model
from torch_pp.devices import DeviceError, pick_dtype
from torch_pp.model.loading import load_stage
from torch_pp.placement.plan import even_plan
from torch_pp.rank0.install import install


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # a head of its own; a head tied to the embedding
def test_the_last_stage_of_a_split_head_reads_only_its_rows(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from torch_pp.model import loading

    folder = write_tiny_model(arch, tmp_path / arch)
    plan, cut = even_plan(num_layers=4, num_stages=2), 128
    reads = []
    original = loading.SafetensorsReader.read

    def recording(self, key, *, first_row=0):
        out = original(self, key, first_row=first_row)
        reads.append((key, first_row, tuple(out.shape)))
        return out

    from unittest import mock

    with mock.patch.object(loading.SafetensorsReader, "read", recording):
        last = loading.load_stage(folder, plan=plan, rank=1, device=torch.device("cpu"), dtype=torch.float32, progress=False,
                                  head_cut=cut)
    head_key = "model.embed_tokens.weight" if arch == "qwen2" else "lm_head.weight"
    assert [r for r in reads if not r[0].startswith("model.layers.")] == [(head_key, cut, (256 - cut, 64)),
                                                                          ("model.norm.weight", 0, (64,))]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    mine = dict(last.model.named_parameters())
    assert torch.equal(mine["lm_head.weight"], ref.lm_head.weight[cut:]) and torch.equal(mine["model.norm.weight"], ref.model.norm.weight)
    hidden = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(last.runner.tail.logits(hidden), F.linear(ref.model.norm(hidden), ref.lm_head.weight[cut:]))
    first = loading.load_stage(folder, plan=plan, rank=0, device=torch.device("cpu"), dtype=torch.float32, progress=False,
                               head_cut=cut)
    # Rank 0 splits steps of those row counts (sequences x positions) whose parts this CPU multiplies
    # exactly as the whole head; checked here on other inputs.
    weight, gen = ref.lm_head.weight.detach(), torch.Generator().manual_seed(123)
    exact = set()
    for m in range(1, 9):
        x = 3 * torch.randn(m, 1, 64, generator=gen)
        whole = F.linear(x, weight)
        if torch.equal(whole[..., :cut], F.linear(x, weight[:cut])) and torch.equal(whole[..., cut:], F.linear(x, weight[cut:])):
            exact.add(m)
    assert first.head_cut == cut
    rank0 = install(first.model, transport=None, device=torch.device("cpu"), num_stages=plan.num_stages,
                    remote=first.remote, head_cut=first.head_cut)
    assert rank0.span.head is rank0.head
    head = rank0.head
    assert (head is None) if not exact else (head.rows == exact and head.cut == cut)
    if head is not None:
        with torch.no_grad():
            assert head.wants(1, 1) == (1 in exact) and not head.wants(9, 1) and not head.wants(1, 0)
        assert not head.wants(1, 1)  # with gradients on, HF's lm_head multiplies (autograd records it)
