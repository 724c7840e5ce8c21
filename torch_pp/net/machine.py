"""The machine a rank runs on: telling machines apart, and keeping a Mac awake while it serves.

Ranks on one machine share its memory and can see each other's processes. A hostname is not
enough to tell machines apart (cloned Macs share one) and neither is a machine id
(network-namespace test hosts share the real machine's); the pair tells them apart in both cases.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def machine_id() -> str | None:
    """An id of this machine that survives renaming and differs between cloned machines, or None.

    Linux: ``/etc/machine-id``; macOS: the hardware's IOPlatformUUID; else the MAC address. None
    when none is known (some containers and VMs have no machine-id): then the hostname alone
    tells machines apart. Never a random value: every process of one machine must agree.
    """
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text:
            return text
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if "IOPlatformUUID" in line:
                    return line.split("=")[-1].strip().strip('"')
        except (OSError, subprocess.SubprocessError):
            pass
    return _hardware_address()


def _hardware_address() -> str | None:
    """The MAC address, unless Python had to make one up (a random one, different in every process)."""
    import uuid

    node = uuid.getnode()
    return None if node >> 40 & 1 else f"{node:012x}"  # the multicast bit marks a random stand-in


def same_machine(a: dict, b: dict) -> bool:
    """Whether two hellos come from one machine: the same machine id and hostname (cloned Macs share
    a hostname, network-namespace test hosts share a machine id; neither shares both)."""
    return (a.get("machine"), a["host"]) == (b.get("machine"), b["host"])


def keep_awake() -> subprocess.Popen | None:
    """On macOS, keep the machine from idle-sleeping while this process lives.

    A Mac that sleeps stops its heartbeats and the other stages declare it lost. ``caffeinate -i
    -w PID`` holds an idle-sleep assertion until this process ends, and then exits by itself.
    Returns the helper process (None elsewhere, or without ``caffeinate``).
    """
    if platform.system() != "Darwin" or shutil.which("caffeinate") is None:
        return None
    return subprocess.Popen(["caffeinate", "-i", "-w", str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
