"""What only a Mac, or only one kind of device, shows, tested through the pure pieces that decide it
(the Mac path is the same code)."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

from torch_pp.devices import choose_attention_kernels, default_dtype, peak_memory_bytes, peak_rss_bytes
from torch_pp.rank0.turn import DeviceTurn
from torch_pp.net.doctor import mac_checks
from torch_pp.net.machine import same_machine

BF16 = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize("device, checkpoint, supported, want", [
    ("mps", "bfloat16", BF16, "bfloat16"),  # the checkpoint's own dtype: never fp16 for bf16 weights
    ("mps", "bfloat16", BF16[:2], "float32"),  # no bf16 (macOS 13): fp32, not an overflowing fp16
    ("mps", "float16", BF16, "float16"),
    ("mps", "float32", BF16, "bfloat16"),
    ("mps", None, BF16[:2], "float32"),
    ("cuda", "bfloat16", BF16, "bfloat16"),
    ("cuda", "float32", BF16[:2], "float16"),  # a card without bf16
    ("cpu", "bfloat16", BF16, "float32"),
])
def test_default_dtype(device, checkpoint, supported, want):
    assert default_dtype(device, checkpoint, supported) == want


def test_only_cuda_gives_up_cudnn_attention():
    # cuDNN plans each new attention shape (55-70 ms each on an H200); MPS and CPU keep their kernels.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        for device in ("cpu", "mps"):
            choose_attention_kernels(torch.device(device))
            assert torch.backends.cuda.cudnn_sdp_enabled(), device
        choose_attention_kernels(torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_peak_memory_is_in_bytes():
    big = torch.ones(64 * 2**20, dtype=torch.uint8) + 1  # 64 MiB touched
    assert peak_rss_bytes() >= big.numel()
    assert peak_memory_bytes(torch.device("cpu")) == peak_rss_bytes()


def test_device_turn_lets_one_thread_work_and_waits_give_it_up():
    turn, inside, log = DeviceTurn(), [0], []

    def worker(name):
        for _ in range(20):
            with turn.held():
                with turn.held():  # re-entrant: generate() calls forward()
                    inside[0] += 1
                    log.append(inside[0])
                    time.sleep(0.001)
                    inside[0] -= 1
                with turn.given_up():  # a wait on the wire: another thread may work meanwhile
                    time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(log) == 80 and max(log) == 1, "two threads were inside at once"
    with turn.given_up():  # without the turn it is a no-op
        pass


def _counted(notify, i, wakes, n=1):
    wakes.append(i)
    notify(n)


def test_device_turn_goes_to_waiters_in_arrival_order_and_wakes_only_the_next():
    turn, order = DeviceTurn(), []

    def worker(i):
        with turn.held():
            order.append(i)

    wakes = []
    with turn.held():
        threads = []
        for i in range(6):  # each queued before the next arrives
            threads.append(threading.Thread(target=worker, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(turn._queue) < i + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
        # record which waiting thread each release wakes: only the next one may be, once
        for i, waiting in enumerate(list(turn._queue)):
            waiting.notify = functools.partial(_counted, waiting.notify, i, wakes)
    for t in threads:
        t.join(timeout=10)
    assert order == list(range(6))
    assert wakes == list(range(6)), wakes  # each release woke exactly the next waiter


def test_machines_are_told_apart_by_id_hostname_and_route():
    a = {"host": "studio", "machine": "uuid-1", "route": "10.0.0.1"}
    assert same_machine(a, {"host": "studio", "machine": "uuid-1", "route": "10.0.0.1"})
    assert not same_machine(a, {"host": "studio", "machine": "uuid-2", "route": "10.0.0.1"})  # a cloned Mac
    assert not same_machine(a, {"host": "host1", "machine": "uuid-1", "route": "10.0.0.1"})  # a network-namespace test host
    assert not same_machine(a, {"host": "studio", "machine": "uuid-1", "route": "10.0.0.2"})  # a clone of the whole image


def test_doctor_flags_what_breaks_a_mac():
    node = {"rank": 1, "host": "studio2", "python": "3.9.6", "iface": None,
            "mac": {"macos": "13.6", "sleep_minutes": 10, "caffeinate": False, "firewall_on": True}}
    warnings, problems = mac_checks(node)
    assert any("macOS 13.6" in p for p in problems) and any("Python 3.9.6" in p for p in problems)
    text = " ".join(warnings)
    assert "idle-sleeps" in text and "firewall" in text and "GLOO_SOCKET_IFNAME" in text
    good = {"rank": 0, "host": "studio1", "python": "3.12.1", "iface": "bridge0",
            "mac": {"macos": "15.1", "sleep_minutes": 0, "caffeinate": True, "firewall_on": False}}
    assert mac_checks(good) == ([], [])


def test_every_process_of_a_machine_gives_the_same_id():
    """Where no machine-id file exists (seen on a GPU VM) the fallback must not be a per-process random
    value, or two ranks on one machine would count as two machines."""
    import subprocess
    import sys

    code = "from torch_pp.net.machine import machine_id, _hardware_address; print(machine_id(), _hardware_address())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(3)}
    assert len(outs) == 1, outs
