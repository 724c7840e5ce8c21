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
if t.rank == 0:
    t.send(Message(Op.FORWARD, {"k": 1}, tensors), dst=1)
    t.send(Message(Op.FORWARD, {"big": 1}, [torch.arange(100_000)]), dst=1)  # larger than a frame
    t.send(Message(Op.SHUTDOWN), dst=1)
else:
    first, big, second = t.recv(src=0), t.recv(src=0), t.recv(src=0)
    equal = [a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(tensors, first.tensors)]
    equal.append(torch.equal(big.tensors[0], torch.arange(100_000)))
    with open(os.path.join(os.environ["OUT"], "wire.json"), "w") as f:
        json.dump({"equal": equal, "ops": [first.op.name, second.op.name], "meta": first.meta}, f)
t.close()
