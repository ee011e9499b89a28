"""Multi-node launches without a cluster: the stage script's networking preflight, and HSDP
([launch] sharding = "hybrid") on a 2 x 2 mesh of CPU ranks, two "nodes" of two ranks started on
this machine through one c10d rendezvous, as run.sbatch starts them on two nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from conftest import check_ok, load_weights, read_metrics, stage_env

from stepc.runlock import ENV, acquire, release


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(run_dir, env, **extra) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(run_dir / "stage-1.sh")], env={**env, **extra}, cwd=run_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_multi_node_launch_that_would_bind_to_loopback_is_refused_before_torchrun(make_run):
    """No interface named: a loopback rendezvous endpoint (or host name) is exit 2 naming
    launch.network_interface; a named interface that does not exist is exit 2 listing the real ones;
    either way before torchrun (no worker ever writes metrics)."""
    run = make_run.compile("mn", launch={"nnodes": 2, "nproc_per_node": 1})
    env = {**stage_env(), "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{_free_port()}"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    proc = subprocess.run(["bash", str(run / "stage-1.sh")], env=env, cwd=run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "loopback" in proc.stderr and "[launch.network_interface]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists()

    run = make_run.compile("mn2", launch={"nnodes": 2, "nproc_per_node": 1, "network_interface": "nosuch9"})
    proc = subprocess.run(["bash", str(run / "stage-1.sh")], env=env, cwd=run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nosuch9" in proc.stderr and "does not exist" in proc.stderr, proc.stderr[-2000:]
    assert "lo" in proc.stderr.split("one of:", 1)[1]  # the interfaces this node has
    assert not (run / "metrics.jsonl").exists()


def test_network_interface_is_validated_at_compile_time(make_run):
    from stepc.cli import main

    spec = make_run.spec("bad", launch={"nnodes": 2, "network_interface": "eth0;reboot"})
    assert main(["compile", str(spec), "--out", str(make_run.root / "out-bad")]) == 2


def test_hybrid_sharding_on_a_2x2_mesh_trains_like_full_sharding(full_run, make_run):
    """HSDP over 2 "nodes" x 2 ranks (micro batch 1: the same global batch of 4 sequences) against
    the session's 2-rank FSDP run of the same spec, which tests/test_runtime.py matches to 1 rank:
    the same logged losses (1e-6 relative, that test's tolerance), every weight within 2e-4 of its
    norm (the largest elementwise difference, 2e-5, sits in a rare token's embedding row, where AdamW
    magnifies the other reduction order), and the measured model-state bytes are two copies (one per
    node) of the exact prediction: FSDP over all 4 ranks would hold one."""
    run = make_run.compile("rt", train={"micro_batch_size": 1},
                           launch={"nnodes": 2, "nproc_per_node": 2, "sharding": "hybrid", "network_interface": "lo"})
    port = _free_port()
    env = {**stage_env(), "NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{port}",
           "RDZV_ID": f"hsdp-{port}", "OMP_NUM_THREADS": "1"}
    lock = acquire(run, os.getpid(), "test_multinode")  # one launch holds the run directory, as run.sbatch does
    try:
        env[ENV] = lock["owner"]
        nodes = [_stage(run, env, RDZV_HEAD_NODE="first-node", SLURMD_NODENAME=name)  # the head hosts the store
                 for name in ("first-node", "second-node")]
        outs = [node.communicate(timeout=600) for node in nodes]
    finally:
        release(run)
    for node, (out, err) in zip(nodes, outs):
        check_ok(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    train = [m for m in read_metrics(run) if m["event"] == "train" and m["stage"] == 1]
    start = next(m for m in read_metrics(run) if m["event"] == "stage_start")
    assert start["world"] == 4
    full = {m["step"]: m["loss"] for m in read_metrics(full_run) if m["event"] == "train" and m["stage"] == 1}
    assert [m["step"] for m in train] == sorted(full) and len(train) >= 2
    for m in train:
        assert m["loss"] == pytest.approx(full[m["step"]], rel=1e-6), (m["step"], m["loss"], full[m["step"]])
    a = load_weights(run / "checkpoints" / "stage-1" / "final")
    b = load_weights(full_run / "checkpoints" / "stage-1" / "final")
    assert sorted(a) == sorted(b)
    for key in a:  # as in test_gpu_compile: AdamW magnifies reduction-order rounding where a gradient is ~0
        assert float((a[key] - b[key]).norm() / b[key].norm()) < 2e-4, key
    plan = json.loads((run / "manifest.json").read_text())["plan"]["stages"][0]
    tensors = len(a)  # every exported tensor is trainable in stage 1
    assert train[0]["model_state_bytes"] == train[0]["predicted_model_state_bytes"]
    assert train[0]["model_state_bytes"] == 2 * plan["exact_model_state_bytes"] + 4 * tensors * (4 - 2)


def test_hybrid_sharding_is_accounted_as_one_nodes_shards():
    """Under HSDP every GPU holds what FSDP over one node's ranks holds: the device accounting of
    2 nodes x 4 hybrid equals that of 1 node x 4, and is above 2 nodes x 4 fully sharded."""
    from stepc.compiler import plan_spec
    from stepc.compiler.overrides import resolve
    from test_fit import PAPER

    def peaks(*sets):
        pinned = ["memory.layers=[13, 11]", 'memory.accounting="device"', 'memory.budget="1000TB"',
                  "train.global_batch_tokens=1048576", *sets]
        return [s.peak_bytes for s in plan_spec(resolve(PAPER, pinned)[0], str(PAPER))[1].stages]

    hybrid = peaks("launch.nnodes=2", "launch.nproc_per_node=4", 'launch.sharding="hybrid"')
    assert hybrid == peaks("launch.nnodes=1", "launch.nproc_per_node=4")
    assert all(h > f for h, f in zip(hybrid, peaks("launch.nnodes=2", "launch.nproc_per_node=4")))
