"""Message framing, pure and over real Gloo processes."""

import json
import threading

import pytest
import torch

from conftest import TEST_DEVICE, WORKERS, torchrun
from torch_pp.devices.copies import Inbox
from torch_pp.rank0.outbox import Outbox
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


@pytest.mark.parametrize("device", sorted({"meta", "cpu", TEST_DEVICE}))
def test_a_stage_places_small_messages_in_kept_buffers(device):
    """A decode step's tensors reach the device in one copy, into the buffer kept for their layout
    (values checked on a real device, TORCH_PP_TEST_DEVICE; on the meta device the bookkeeping)."""
    inbox = Inbox(torch.device(device), keep=2)

    def received(seed: int, rows: int = 1) -> Message:
        g = torch.Generator().manual_seed(seed)
        tensors = [torch.randn(rows, 1, 64, generator=g).to(torch.bfloat16), torch.tensor([seed]),
                   torch.randn(1, 1, 8, generator=g), torch.tensor([[True]])]
        return wire.unpack(*wire.pack(Message(Op.FORWARD, {}, tensors)))

    def storages(tensors):
        return {t.untyped_storage()._cdata for t in tensors}

    first = received(1)
    with torch.inference_mode():  # buffers made in one mode are written in another
        placed = inbox.place(first)
    assert first._tensors is None  # no CPU views of the payload made on the way
    assert [(t.device.type, t.dtype, t.shape) for t in placed] == [(device, t.dtype, t.shape) for t in first.tensors]
    assert len(storages(placed)) == 1  # one copy, one buffer
    second = received(2)
    again = inbox.place(second)
    assert storages(again) == storages(placed)  # the same layout: the same buffer, its views made once
    if device != "meta":
        assert all(torch.equal(a.cpu(), b) for a, b in zip(again, second.tensors))
    wider = received(3, rows=2)
    assert storages(inbox.place(wider)) != storages(placed)  # another layout, another buffer
    widest = received(4, rows=3)
    inbox.place(widest)
    assert len(inbox._layouts) == 2  # the least recently used layout dropped
    # a large message (a prefill chunk) is copied tensor by tensor, as it comes
    big = wire.unpack(*wire.pack(Message(Op.FORWARD, {}, [torch.zeros(inbox.max_bytes), torch.tensor([1])])))
    moved = inbox.place(big)
    assert len(storages(moved)) == 2 and len(inbox._layouts) == 2


@pytest.mark.skipif(TEST_DEVICE == "cpu", reason="copies out of an accelerator: TORCH_PP_TEST_DEVICE=cuda or mps")
def test_rank_0_sends_small_tensors_in_one_copy_per_thread():
    """The counterpart on rank 0: a step's small device tensors come to the CPU in one copy, into
    host buffers kept per layout and per thread (lanes send at once)."""
    device = torch.device(TEST_DEVICE)
    outbox = Outbox(device)

    def step(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [t.to(device) for t in (torch.randn(1, 1, 64, generator=g).to(torch.bfloat16), torch.tensor([seed]),
                                       torch.randn(2, 8, generator=g).t(), torch.tensor([[True]]))]

    with torch.inference_mode():  # generate() runs so, a direct forward may not: both write the kept buffers
        first = step(1)
        out = outbox.stage(first)
    assert all(o.device.type == "cpu" and torch.equal(o, t.cpu()) for o, t in zip(out, first))
    assert len({o.untyped_storage()._cdata for o in out}) == 1
    again = outbox.stage(step(2))  # the same layout: the same host buffer, new values (grad mode on)
    assert {o.untyped_storage()._cdata for o in again} == {o.untyped_storage()._cdata for o in out}
    assert all(torch.equal(o, t.cpu()) for o, t in zip(again, step(2)))
    other = {}
    thread = threading.Thread(target=lambda: other.setdefault("out", outbox.stage(step(3))))
    thread.start()
    thread.join(timeout=30)
    assert {o.untyped_storage()._cdata for o in other["out"]}.isdisjoint({o.untyped_storage()._cdata for o in out})
    assert all(torch.equal(o, t.cpu()) for o, t in zip(again, step(2)))  # this thread's views untouched


@pytest.mark.skipif(TEST_DEVICE == "cpu", reason="copies out of an accelerator: TORCH_PP_TEST_DEVICE=cuda or mps")
def test_rank_0_copies_a_prefills_tensors_into_host_memory_it_keeps():
    """A large message (a prefill's hidden state) comes to the CPU tensor by tensor into one host
    buffer kept per thread (page-locked on CUDA), reused while large enough, grown when not."""
    device = torch.device(TEST_DEVICE)
    outbox = Outbox(device)

    def prefill(seed: int, tokens: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [t.to(device) for t in (torch.randn(1, tokens, 256, generator=g).to(torch.bfloat16),
                                       torch.arange(tokens), torch.randn(256, tokens, generator=g).t())]

    with torch.inference_mode():
        first = prefill(1, 300)
        out = outbox.stage(first)
    assert all(o.device.type == "cpu" and torch.equal(o, t.cpu()) for o, t in zip(out, first))
    storage = {o.untyped_storage().data_ptr() for o in out}
    assert len(storage) == 1 and all(o.is_pinned() == (device.type == "cuda") for o in out)
    shorter = prefill(2, 200)  # fits: the same buffer, new values (grad mode on)
    again = outbox.stage(shorter)
    assert {o.untyped_storage().data_ptr() for o in again} == storage
    assert all(torch.equal(o, t.cpu()) for o, t in zip(again, shorter))
    longer = prefill(3, 900)
    grown = outbox.stage(longer)
    assert all(torch.equal(o, t.cpu()) for o, t in zip(grown, longer))
    assert grown[0].untyped_storage().nbytes() >= sum(t.nbytes for t in longer)


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
    # Large payloads landing in the receiver's kept buffer: every one whole; the buffer reused while
    # it is large enough, else grown by doubling (in whole MiB): 3 MiB and a table take 4 MiB,
    # 1 fits, 5 grows it to 8, 2 fits, 12 grows it to 16.
    assert result["kept"] == [True] * 5
    (a, a_mib), (b, b_mib), (c, c_mib), (d, d_mib), (_, e_mib) = result["buffers"]
    assert [a_mib, b_mib, c_mib, d_mib, e_mib] == [4, 4, 8, 8, 16]
    assert a == b and c == d
