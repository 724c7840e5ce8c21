"""Several machines for real: network-namespace hosts, torchrun --nnodes, launch/node.sh."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import psutil
import pytest

import netns
from conftest import free_port
from tiny_models import write_tiny_model

reason = netns.available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

PROMPT = "What is the capital of France? Answer in one sentence."
NEW = 16


@pytest.fixture(scope="module")
def smol(smol_reference):
    folder, tok, ref = smol_reference
    inputs = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    want = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    return folder, want


def run_cluster(cluster: netns.Cluster, args: list[str], *, timeout: float = 240, per_host_env=None, iface: str | None = "eth0"):
    port = free_port()
    procs = [cluster.node(i, args, port=port, env=(per_host_env or {}).get(i), iface=iface) for i in range(cluster.n)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except Exception:
            cluster.close()
            raise
        outs.append((p.returncode, out, err))
    return outs


def await_generation(proc, *, timeout: float = 240) -> None:
    """Wait until rank 0 has printed some of its answer (the pipeline is up and decoding)."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    seen, deadline = b"", time.monotonic() + timeout
    while len(seen) < 40 and time.monotonic() < deadline:
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            pass
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    assert len(seen) >= 40, "generation did not start"


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_give_the_single_host_tokens(smol, hosts):
    folder, want = smol
    with netns.Cluster(hosts, subnet=10 + hosts) as cluster:
        outs = run_cluster(cluster, ["generate", "--model", str(folder), "--prompt", PROMPT, "--chat",
                                     "--max-new-tokens", str(NEW), "--output", "json", "--no-progress"])
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    result = json.loads(outs[0][1].strip().splitlines()[-1])
    assert result["token_ids"] == want
    assert [s["host"] for s in result["stages"]] == [f"host{i}" for i in range(hosts)]
    assert all(out.strip() == "" for _, out, _ in outs[1:]), "only rank 0 writes to stdout"


@pytest.mark.parametrize("iface", ["eth0", None], ids=["GLOO_SOCKET_IFNAME", "no-interface"])
def test_look_alike_hosts_give_the_single_host_tokens(smol, iface):
    """Two hosts with one host name and machine id (clones of one image): each binds Gloo to its
    own link address, the named interface's or the one it reaches the store from, not loopback."""
    folder, want = smol
    with netns.Cluster(2, subnet=70 if iface else 71, own_hostnames=False) as cluster:
        outs = run_cluster(cluster, ["generate", "--model", str(folder), "--prompt", PROMPT, "--chat",
                                     "--max-new-tokens", str(NEW), "--output", "json", "--no-progress"], iface=iface)
        doctor = run_cluster(cluster, ["doctor", "--output", "json"], iface=iface, timeout=180)
    for code, _, err in outs + doctor:
        assert code == 0, err[-3000:]
    result = json.loads(outs[0][1].strip().splitlines()[-1])
    assert result["token_ids"] == want
    assert [s["host"] for s in result["stages"]] == [socket.gethostname()] * 2
    report = json.loads(doctor[0][1].strip().splitlines()[-1])
    subnet = 70 if iface else 71
    assert [n["gloo_address"] for n in report["nodes"]] == [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
    assert [n["iface"] for n in report["nodes"]] == [iface, iface]
    # what told them apart: same machine id, two routes to the store
    assert [n["machine_seen_as"].split(" via ")[1] for n in report["nodes"]] == [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]


def test_a_worker_whose_torchrun_agent_is_killed_exits(smol):
    """The harness kills host 1's launch (SIGKILL of torchrun's process group): its worker, in a
    session of its own, sees its agent gone and exits within 15 s with a message."""
    folder, _ = smol
    with netns.Cluster(2, subnet=72, own_hostnames=False) as cluster:
        port = free_port()
        args = ["generate", "--model", str(folder), "--prompt", "Tell me a long story.", "--chat",
                "--max-new-tokens", "2000", "--min-new-tokens", "2000", "--no-progress"]
        procs = [cluster.node(i, args, port=port, env={"TORCH_PP_JOIN_TIMEOUT": "120"}) for i in range(2)]
        await_generation(procs[0])
        cmdlines = {p: " ".join(psutil.Process(p).cmdline()) for p in cluster.pids(1)}
        agent = next(p for p, c in cmdlines.items() if "torch.distributed.run" in c)
        workers = [p for p, c in cmdlines.items() if "-m torch_pp" in c and "torch.distributed.run" not in c]
        assert workers, cmdlines
        os.killpg(os.getpgid(agent), signal.SIGKILL)
        start = time.monotonic()
        while any(psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE for w in workers) \
                and time.monotonic() - start < 30:
            time.sleep(0.1)
        gone_s = time.monotonic() - start
        _, err1 = procs[1].communicate(timeout=30)
        procs[0].wait(timeout=60)
        err0 = procs[0].stderr.read()
    print(f"the worker was gone {gone_s:.1f} s after its agent")  # shown with pytest -s
    assert gone_s <= 15, f"the worker lived {gone_s:.1f} s after its agent"
    assert "rank 1 on " in err1 and "the torchrun agent that started this worker" in err1, err1[-3000:]
    assert procs[0].returncode != 0 and "lost stage 1" in err0, err0[-3000:]


def test_killed_host_stops_every_other_host(smol):
    folder, _ = smol
    with netns.Cluster(3, subnet=20) as cluster:
        port = free_port()
        args = ["generate", "--model", str(folder), "--prompt", "Tell me a long story.", "--chat",
                "--max-new-tokens", "2000", "--min-new-tokens", "2000", "--no-progress"]
        procs = [cluster.node(i, args, port=port) for i in range(3)]
        await_generation(procs[0])
        victims = [p for p in cluster.pids(1) if "torch_pp" in " ".join(psutil.Process(p).cmdline()) and "torch.distributed.run" not in " ".join(psutil.Process(p).cmdline())]
        assert victims, "no stage process in host 1"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        codes = {}
        for i in (0, 2):
            procs[i].wait(timeout=60)
            codes[i] = (procs[i].returncode, time.monotonic() - start, procs[i].stderr.read())
    for i, (code, seconds, err) in codes.items():
        assert code != 0, f"host {i} exited 0"
        assert seconds <= 15, f"host {i} took {seconds:.1f}s"
        assert "lost stage 1 on host1 (layers 10:20)" in err, err[-3000:]


def test_different_model_on_one_host_fails_startup_everywhere(tmp_path):
    a = write_tiny_model("llama", tmp_path / "a", seed=0)
    b = write_tiny_model("llama", tmp_path / "b", seed=1)  # same architecture and sizes, other weights
    with netns.Cluster(2, subnet=30) as cluster:
        port = free_port()
        procs = [cluster.node(i, ["generate", "--model", str(m), "--prompt", "hi", "--no-progress"], port=port)
                 for i, m in enumerate((a, b))]
        outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode != 0
        assert "ranks disagree on model" in err, err[-3000:]
        assert "rank 0 (host0)" in err and "rank 1 (host1)" in err


def test_doctor_measures_a_capped_link(tmp_path):
    with netns.Cluster(2, subnet=40) as cluster:
        cluster.cap(1, rate="1gbit")
        outs = run_cluster(cluster, ["doctor", "--output", "json"], timeout=180)
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    report = json.loads(outs[0][1].strip().splitlines()[-1])
    assert [n["host"] for n in report["nodes"]] == ["host0", "host1"]
    assert all(n["iface"] == "eth0" and n["address"].startswith("10.77.40.") for n in report["nodes"])
    links = {(l["from"], l["to"]): l for l in report["links"]}
    capped = links[(1, 0)]["gbit_per_s"]
    assert 0.7 <= capped <= 1.3, f"capped link measured {capped:.2f} Gbit/s"
    assert links[(0, 1)]["gbit_per_s"] > 1.5, "the uncapped direction should be faster"
    assert all(l["latency_ms"] > 0 for l in links.values())


def test_ipv6_on_the_link_gloo_still_uses_ipv4(tmp_path):
    """A link with an IPv6 address as well (as a Mac's bridge0 has): the group forms over IPv4 and
    what doctor reports is the address Gloo uses."""
    with netns.Cluster(2, subnet=50) as cluster:
        for i in range(2):
            cluster.add_ipv6(i)
        outs = run_cluster(cluster, ["doctor", "--output", "json"], timeout=180)
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    report = json.loads(outs[0][1].strip().splitlines()[-1])
    assert [n["gloo_address"] for n in report["nodes"]] == ["10.77.50.1", "10.77.50.2"]
    assert [n["address"] for n in report["nodes"]] == ["10.77.50.1", "10.77.50.2"]


def test_a_join_that_cannot_connect_gives_up_in_time(tmp_path):
    """Host 1 advertises an address host 0 cannot reach (packets vanish): every rank stops within
    TORCH_PP_JOIN_TIMEOUT, naming the rank it could not reach, instead of waiting forever."""
    model = write_tiny_model("llama", tmp_path / "m")
    with netns.Cluster(2, subnet=60) as cluster:
        bad = cluster.add_unreachable_link(1)
        port = free_port()
        env = {"TORCH_PP_JOIN_TIMEOUT": "10"}
        args = ["generate", "--model", str(model), "--prompt", "hi", "--no-progress"]
        start = time.monotonic()
        procs = [cluster.node(0, args, port=port, env=env), cluster.node(1, args, port=port, env=env, iface="eth1")]
        outs = [p.communicate(timeout=120) for p in procs]
        seconds = time.monotonic() - start
    for p in procs:
        assert p.returncode != 0
    assert seconds < 40, f"took {seconds:.0f} s"
    err0, err1 = outs[0][1], outs[1][1]
    assert f"could not connect to rank 1 on host1 ({bad})" in err0, err0[-3000:]
    assert "TORCH_PP_JOIN_TIMEOUT" in err0
    assert "could not connect to rank 0 on host0 (10.77.60.1)" in err1, err1[-3000:]
