"""One liveness monitor on a real TCPStore, as if on its own host; or the store's host itself.

    monitor_worker.py store PORT            host the store until killed
    monitor_worker.py RANK PORT HOSTS       run rank RANK's monitor; HOSTS: one host name per rank

A rank prints "ready" once connected and starts its monitor when the test posts "go", so every
monitor starts at about the same time, as after the runtime's hello (a rank still importing torch
while the others watch would rightly count as silent).
"""

import datetime
import sys
import time

import torch.distributed as dist

from torch_pp.net.liveness import Monitor

role, port = sys.argv[1], int(sys.argv[2])
if role == "store":
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    print("ready", flush=True)
    while True:
        time.sleep(1)
rank, hosts = int(role), sys.argv[3].split(",")
client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
peers = {r: {"host": h, "pid": 0} for r, h in enumerate(hosts) if h}  # other hosts: the pid is never checked
print("ready", flush=True)
client.wait(["go"])
monitor = Monitor(dist.PrefixStore("torch_pp/", client), rank=rank, peers=peers).start()
monitor.describe(layers=(10 * rank, 10 * rank + 10))
while True:
    time.sleep(1)
