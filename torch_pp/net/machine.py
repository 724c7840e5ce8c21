"""The machine a rank runs on: telling machines apart, and keeping a Mac awake while it serves.

Ranks on one machine share its memory and can see each other's processes. A hostname is not
enough to tell machines apart (cloned Macs share one), nor is a machine id (network-namespace
test hosts share the real machine's), nor both together: containers and VMs cloned from one
image, and namespaces that keep the host's name, share both. What clones never share is the
address they reach the rendezvous store from (``store_route``), so a machine is all three.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
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


def store_route(addr: str, port: int) -> str | None:
    """The local address this process reaches ``addr`` from (what the kernel's routing picks), or None.

    Every process of one machine reaches a given address from the same local address (127.0.0.1
    for a loopback store, the machine's own address on the link otherwise); two machines never do,
    however alike they are. Connecting a UDP socket sends nothing: it only asks for the route.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, sockaddr in sorted(infos, key=lambda info: info[0] != socket.AF_INET):  # IPv4 first
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def machine_key(facts: dict) -> tuple:
    """What tells one machine from another in a rank's facts (a hello, or a row built from one):
    its machine id, hostname and the address it reaches the store from."""
    return facts.get("machine"), facts["host"], facts.get("route")


def same_machine(a: dict, b: dict) -> bool:
    """Whether two ranks' facts come from one machine (see ``machine_key``)."""
    return machine_key(a) == machine_key(b)


def machine_label(facts: dict) -> str:
    """A short text naming what ``machine_key`` compared, for ``doctor``."""
    mid = facts.get("machine")
    return f"{mid[:8] if mid else 'no id'} via {facts.get('route') or '?'}"


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
