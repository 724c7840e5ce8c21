"""Rank 1 converts the default model while rank 0 waits; both must get the same complete folder."""

import json
import os
import time

from torch_pp.default_model import ensure_default_model
from torch_pp.net.transport import Transport

t = Transport.from_env()
if t.rank == 0:
    time.sleep(4)  # let rank 1 take the lock and convert inside an initialised process group
path = ensure_default_model(progress=False)
rows = t.all_gather(sorted(os.listdir(path)))
if t.rank == 0:
    with open(os.path.join(os.environ["OUT"], "convert.json"), "w") as f:
        json.dump(rows, f)
t.close()
