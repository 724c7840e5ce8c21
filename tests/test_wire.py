"""Message framing, pure and over real Gloo processes."""

import json

import pytest
import torch

from conftest import WORKERS, torchrun
from torch_pp.net import wire
from torch_pp.net.wire import Message, Op


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


@pytest.mark.parametrize("frame_bytes, inline", [(32 * 1024, True), (256, False)])
def test_pack_unpack_round_trip(frame_bytes, inline):
    tensors = sample_tensors()
    frame, rest = wire.pack(Message(Op.FORWARD, {"a": [1, 2], "b": "x"}, tensors), seq=5, sender=3, frame_bytes=frame_bytes)
    assert frame.dtype == torch.uint8 and frame.numel() == frame_bytes
    total, is_inline = wire.read_header(frame, expected_sender=3)
    assert is_inline == inline and (rest is None) == inline
    if not inline:
        assert rest.numel() == total
    msg = wire.unpack(frame, rest)
    assert msg.op == Op.FORWARD and msg.meta == {"a": [1, 2], "b": "x"}
    for a, b in zip(tensors, msg.tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_header_checks():
    frame, _ = wire.pack(Message(Op.SHUTDOWN), sender=1)
    with pytest.raises(wire.WireError, match="expected a message from rank 2"):
        wire.read_header(frame, expected_sender=2)
    for word, value, message in [(0, 123, "bad magic"), (1, 99, "wire protocol 99")]:
        bad = frame.clone()
        bad[: wire.HEADER_BYTES].view(torch.int64)[word] = value
        with pytest.raises(wire.WireError, match=message):
            wire.read_header(bad, expected_sender=1)


def test_messages_cross_real_gloo_processes(tmp_path):
    run = torchrun(2, [str(WORKERS / "wire_worker.py")], env={"OUT": str(tmp_path)}, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "wire.json").read_text())
    assert result["equal"] == [True] * (len(sample_tensors()) + 1)
    assert result["ops"] == ["FORWARD", "SHUTDOWN"]
    assert result["meta"] == {"k": 1}
