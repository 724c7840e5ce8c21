"""Rank 0 sends framed messages to rank 1 over Gloo; rank 1 checks them and records the result."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

from test_wire import sample_tensors  # noqa: E402
from torch_pp.net.transport import Transport  # noqa: E402
from torch_pp.net.wire import Message, Op  # noqa: E402

t = Transport.from_env()
tensors = sample_tensors()
# Large payloads through the buffers the link keeps (a prefill's hidden states), smaller and larger
# in turn: each must arrive whole, whatever the one before it left in the buffer.
SIZES = [3 << 20, 1 << 20, 5 << 20, 2 << 20, 12 << 20]


def large(i: int, nbytes: int) -> torch.Tensor:
    return torch.randint(-100, 100, (nbytes // 2,), generator=torch.Generator().manual_seed(i), dtype=torch.int16)


if t.rank == 0:
    t.send(Message(Op.FORWARD, {"k": 1}, tensors), dst=1)
    t.send(Message(Op.FORWARD, {"big": 1}, [torch.arange(100_000)]), dst=1)  # larger than a frame
    for i, n in enumerate(SIZES):
        t.send(Message(Op.FORWARD, {"i": i}, [large(i, n), torch.tensor([i])]), dst=1)
    t.send(Message(Op.SHUTDOWN), dst=1)
else:
    first, big = t.recv(src=0), t.recv(src=0)
    kept, addresses = [], []
    for i, n in enumerate(SIZES):
        msg = t.recv(src=0, kept=True)
        kept.append(msg.meta["i"] == i and torch.equal(msg.tensors[0], large(i, n)) and msg.tensors[1].item() == i)
        storage = msg.data.untyped_storage()  # the kept buffer the payload is a view of
        addresses.append((storage.data_ptr(), storage.nbytes() >> 20))
    second = t.recv(src=0)
    equal = [a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(tensors, first.tensors)]
    equal.append(torch.equal(big.tensors[0], torch.arange(100_000)))
    with open(os.path.join(os.environ["OUT"], "wire.json"), "w") as f:
        json.dump({"equal": equal, "ops": [first.op.name, second.op.name], "meta": first.meta, "kept": kept,
                   "buffers": addresses}, f)
t.close()
