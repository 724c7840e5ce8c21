"""Message framing, pure and over real Gloo processes."""

import json

import pytest
import torch

from conftest import WORKERS, torchrun
from torch_pp import wire
from torch_pp.wire import Message, Op


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 3, 5, generator=g),
        torch.randn(4, 4, generator=g).to(torch.bfloat16),
        torch.randn(3, generator=g).to(torch.float16),
        torch.arange(7),
        torch.tensor([[True, False], [False, True]]),
        torch.tensor(3.5),  # 0-dim
        torch.empty(0, 4),  # empty
        torch.randn(6, 4, generator=g).t(),  # non-contiguous: must be made contiguous, not fail
    ]


def test_pack_unpack_round_trip():
    tensors = sample_tensors()
    header, payload = wire.pack(Message(Op.FORWARD, {"a": [1, 2], "b": "x"}, tensors), seq=5, sender=3)
    assert header.dtype == torch.int64 and header.numel() == wire.HEADER_WORDS
    assert wire.payload_size(header, expected_sender=3) == payload.numel()
    msg = wire.unpack(header, payload)
    assert msg.op == Op.FORWARD and msg.meta == {"a": [1, 2], "b": "x"}
    for a, b in zip(tensors, msg.tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_header_checks():
    header, _ = wire.pack(Message(Op.SHUTDOWN), sender=1)
    with pytest.raises(wire.WireError, match="expected a message from rank 2"):
        wire.payload_size(header, expected_sender=2)
    bad = header.clone()
    bad[0] = 123
    with pytest.raises(wire.WireError, match="bad magic"):
        wire.payload_size(bad, expected_sender=1)
    bad = header.clone()
    bad[1] = 99
    with pytest.raises(wire.WireError, match="wire protocol 99"):
        wire.payload_size(bad, expected_sender=1)


def test_messages_cross_real_gloo_processes(tmp_path):
    run = torchrun(2, [str(WORKERS / "wire_worker.py")], env={"OUT": str(tmp_path)}, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "wire.json").read_text())
    assert result["equal"] == [True] * len(sample_tensors())
    assert result["ops"] == ["FORWARD", "SHUTDOWN"]
    assert result["meta"] == {"k": 1}
