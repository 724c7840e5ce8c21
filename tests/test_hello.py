"""Start-up hello checks that turn Gloo hangs into messages (pure: no processes)."""

import pytest

from torch_pp.errors import TransportError
from torch_pp.net.link import SimulatedLink
from torch_pp.net.machine import store_route
from torch_pp.net.rendezvous import advertised_address, check_hellos, gloo_address, on_one_machine


def hello(host, os_name="Linux", address="10.0.0.1", iface="eth0"):
    return {"host": host, "os": os_name, "address": address, "iface": iface}


def test_linux_and_macos_cannot_share_a_group():
    with pytest.raises(TransportError, match="different operating systems.*Linux: ranks 0.*Darwin: ranks 1"):
        check_hellos({0: hello("a"), 1: hello("b", "Darwin")})


def test_loopback_across_machines_is_refused():
    with pytest.raises(TransportError, match="rank 1 on b would advertise 127.0.0.1.*GLOO_SOCKET_IFNAME"):
        check_hellos({0: hello("a"), 1: hello("b", address="127.0.0.1", iface=None)})
    check_hellos({0: hello("a", address="127.0.0.1", iface=None), 1: hello("a", address="127.0.0.1", iface=None)})  # one machine: fine


def test_interface_without_address():
    with pytest.raises(TransportError, match="GLOO_SOCKET_IFNAME=en9 has no IPv4 address"):
        check_hellos({0: hello("a"), 1: hello("b", address=None, iface="en9")})


def clone(route, *, iface=None, address=None):
    """A hello from one of several machines cloned from one image: same host name and machine id."""
    return {"host": "vm", "machine": "id-1", "route": route, "os": "Linux", "iface": iface, "address": address or route}


def test_an_explicit_interface_is_never_overridden():
    # One machine (same id, host and route): loopback unless an interface was named.
    alike = {0: clone("127.0.0.1", address="10.0.0.5"), 1: clone("127.0.0.1", address="10.0.0.5")}
    assert on_one_machine(alike) and gloo_address(alike, 1) == "127.0.0.1"
    named = {0: clone("127.0.0.1", iface="eth0", address="10.0.0.5"), 1: clone("127.0.0.1", iface="eth0", address="10.0.0.5")}
    assert [gloo_address(named, r) for r in (0, 1)] == ["10.0.0.5", "10.0.0.5"]
    check_hellos(named)


def test_clones_are_told_apart_by_the_address_that_reaches_the_store():
    clones = {0: clone("10.99.0.1", iface="veth0"), 1: clone("10.99.0.2", iface="veth1")}
    assert not on_one_machine(clones)
    assert [gloo_address(clones, r) for r in (0, 1)] == ["10.99.0.1", "10.99.0.2"]
    unnamed = {0: clone("10.99.0.1"), 1: clone("10.99.0.2")}
    assert [gloo_address(unnamed, r) for r in (0, 1)] == ["10.99.0.1", "10.99.0.2"]
    check_hellos(unnamed)


def test_the_address_advertised_without_an_interface_is_the_one_that_reaches_the_store():
    assert store_route("127.0.0.1", 29500) == "127.0.0.1"
    assert advertised_address(None, route="10.99.0.2") == "10.99.0.2"
    assert advertised_address(None, route="127.0.0.1") != "10.99.0.2"  # loopback: the hostname's address instead
    assert advertised_address("lo", route="10.99.0.2") == "127.0.0.1"  # a named interface wins


def test_simulated_link_specs():
    assert SimulatedLink.from_spec(None) is None
    ten = SimulatedLink.from_spec("10gbe")
    assert ten.latency_s == pytest.approx(50e-6) and ten.gbit_per_s == 9.4
    custom = SimulatedLink.from_spec("latency_ms=2,gbit=1")
    assert custom.latency_s == 0.002 and custom.gbit_per_s == 1.0
    with pytest.raises(TransportError, match="bad TORCH_PP_SIM_LINK"):
        SimulatedLink.from_spec("fast")


def test_nothing_a_peer_sends_is_unpickled():
    """Start-up facts travel as JSON: no pickle-based collective or loader anywhere in the package."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "torch_pp"
    risky = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
             "recv_object_list", "send_object_list", "loads", "load"}
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.name}: import {n}" for n in names if n and n.split(".")[0] in ("pickle", "dill", "cloudpickle")]
            if isinstance(node, ast.Attribute) and node.attr in risky:
                base = ast.unparse(node.value)
                if node.attr in ("loads", "load") and base not in ("torch", "pickle"):
                    continue  # json.loads and the like
                found.append(f"{path.name}:{node.lineno}: {base}.{node.attr}")
    assert found == []


def test_free_ports_lie_below_the_ephemeral_range():
    # A port from the ephemeral range can become a retrying worker's own source port before the store
    # listens (a TCP self-connect), and the store's bind then fails: the notebooks' EADDRINUSE.
    import socket

    from torch_pp.net.rendezvous import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports)
    assert len(ports) > 1  # picked at random, not one fixed port that two tests would share
    with socket.socket() as s:
        s.bind(("", ports.pop()))  # free when handed out
