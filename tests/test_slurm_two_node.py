"""run.sbatch on a real two-node SLURM cluster (two slurmd in network namespaces, tests/slurm_cluster.py).

- a tiny spec with nnodes = 2 (one rank per node) runs through sbatch to completion: the two torchrun agents
  rendezvous on the head node (explicit is_host, a port derived from the job id) and both stages finish;
- scancel mid-stage: every rank finishes the step in flight and checkpoints it (STOPPED names the step,
  no periodic checkpoints exist), a second job on the same run directory meanwhile exits 2 naming the
  holder, and the resubmitted job resumes from that step to an export bit-identical to the uninterrupted run;
- a time limit cut to 1-2 minutes away once stage 1 is held at step 5, with `--signal=B:USR1@90`:
  SLURM's own warning stops stage 1 at that step (a second USR1 meanwhile does no harm), the job
  requeues itself (same job id, restart 1), resumes from that step and completes, bit-identical;
- two launches on one node at once (a plain job and `stepc submit --chain`) both finish: distinct
  rendezvous ports, the chain's stage 2 waits for its stage 1.

Skipped only where the cluster cannot run (no slurm binaries, not root, no network namespaces).
Run under `flock /tmp/stepc-slurm.lock` so two test clusters never run at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import TwoNodeSlurmCluster, two_node_available, two_node_cluster_fixture
except ImportError:  # e.g. --import-mode=importlib: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm_cluster import TwoNodeSlurmCluster, two_node_available, two_node_cluster_fixture

from stepc.cli import main as stepc_main

pytestmark = pytest.mark.skipif(two_node_available() is not None, reason=str(two_node_available()))

REPO = Path(__file__).resolve().parent.parent
NAME = "tiny2n"
CORPUS_FILES = ("comedy_of_errors.txt", "tempest.txt")

cluster = two_node_cluster_fixture(scope="module")

SPEC = """\
[experiment]
name = "{name}"
seed = 7

[model]
hidden_size = 64
num_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 512
seq_len = 64

[memory]
stages = 2
layers = [2, 2]
accounting = "exact"

[step]
lora_rank = 4
relora_reset_every = 100
restart_warmup_steps = 2

[train]
reference_steps = 24
global_batch_tokens = 256
micro_batch_size = 2
lr = 3e-3
warmup_steps = 2
precision = "fp32"
checkpoint_every = 1000

[data]
train = [{train}]
tokenizer = "bpe-512"

[eval]
every_steps = 1000
max_tokens = 2048

[launch]
nnodes = {nnodes}
nproc_per_node = 1

[launch.slurm]
partition = "{partition}"
time = "00:10:00"
cpus_per_task = 1
gpus_per_node = 0
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not (REPO / "data" / "corpus" / "COMPLETE").exists():
        from stepc.corpus import build_corpus

        build_corpus(REPO / "data" / "corpus")
    dest = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        (dest / name).write_bytes((REPO / "data" / "corpus" / "train" / name).read_bytes())
    return dest


def compile_run(root: Path, corpus: Path, cl: TwoNodeSlurmCluster, nnodes: int = 2, name: str = NAME) -> Path:
    """ROOT plays the project root; returns ROOT/runs/<name>."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(name=name, train=json.dumps(str(corpus / "*.txt")), nnodes=nnodes,
                                partition=cl.partition))
    assert stepc_main(["compile", str(spec), "--out", str(root / "runs")]) == 0
    return root / "runs" / name


def job_env(cl: TwoNodeSlurmCluster) -> dict[str, str]:
    """Exported into the job (--export=ALL): this interpreter, this checkout, a private TMPDIR."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHON": sys.executable, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            "TMPDIR": str(cl.tmp_dir), "OMP_NUM_THREADS": "1"}


def logs(run_dir: Path) -> str:
    parts = []
    for f in sorted((run_dir / "logs").glob("*")):
        parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def complete_checkpoints(run_dir: Path, stage: int) -> list[int]:
    stage_dir = run_dir / "checkpoints" / f"stage-{stage}"
    return sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("step-*")
                  if not p.name.endswith(".tmp") and (p / "COMPLETE").is_file())


def assert_finished(run_dir: Path) -> None:
    for stage in (1, 2):
        assert (run_dir / "checkpoints" / f"stage-{stage}" / "final" / "EXPORT_COMPLETE").is_file(), logs(run_dir)
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert [m["stage"] for m in metrics(run_dir) if m.get("event") == "stage_end"] == [1, 2]
    assert not (run_dir / "LOCK").exists()


def assert_same_export(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "export" / "model.safetensors")), load_file(str(b / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"export differs from the uninterrupted run in {differ}"


def wait_for(what: str, condition, cl: TwoNodeSlurmCluster, job: int, run_dir: Path, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = cl.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before {what}\n{logs(run_dir)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs(run_dir)}"
        time.sleep(0.2)


def _seconds(runtime: str) -> int:
    """scontrol's RunTime, [D-]HH:MM:SS, in seconds."""
    days, _, clock = runtime.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def stage_log(run_dir: Path, stage: int) -> str:
    path = run_dir / "logs" / f"stage-{stage}.slurm.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def uninterrupted(cluster: TwoNodeSlurmCluster, corpus: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("project-a")
    run_dir = compile_run(root, corpus, cluster)
    t0 = time.monotonic()
    result = cluster.sbatch("runs/" + NAME + "/run.sbatch", wait=True, cwd=root, env=job_env(cluster))
    return root, run_dir, result, time.monotonic() - t0


def test_two_nodes_run_every_stage(cluster: TwoNodeSlurmCluster, uninterrupted):
    root, run_dir, result, seconds = uninterrupted
    assert result.returncode == 0, f"{result!r}\n{logs(run_dir)}"
    info = cluster.job_info(result.job_id)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", info
    assert_finished(run_dir)
    assert not list(root.glob("slurm-*.out"))  # SLURM's output is under RUN_DIR/logs, not the submit directory
    out = (run_dir / "logs" / f"slurm-{NAME}-{result.job_id}.out").read_text()
    assert f"stages 1 2 of run {NAME} done" in out
    head = cluster.nodes[0]
    port = 29500 + result.job_id % 1000
    for stage in (1, 2):
        log = stage_log(run_dir, stage)
        assert f"stage {stage}/2 on {' '.join(cluster.nodes)}; rendezvous {head}:{port}" in log, log[:600]
        assert "node_rank is only used for static rdzv_backend" not in log  # no ignored flags
    # one agent per node, both in one world of 2
    assert [(m["stage"], m["world"]) for m in metrics(run_dir) if m["event"] == "stage_start"] == [(1, 2), (2, 2)]
    print(f"two-node run: {seconds:.1f} s (submit to completion)")


def test_scancel_mid_stage_then_resubmit_resumes_from_the_signalled_step(cluster: TwoNodeSlurmCluster, corpus: Path,
                                                                          uninterrupted, tmp_path: Path):
    root = tmp_path / "project-b"
    run_dir = compile_run(root, corpus, cluster)
    script = "runs/" + NAME + "/run.sbatch"
    first = cluster.sbatch(script, wait=False, cwd=root, env=job_env(cluster))
    assert first.returncode == 0 and first.job_id is not None, first
    wait_for("the job's lock", lambda: (run_dir / "LOCK").exists(), cluster, first.job_id, run_dir)

    # a second job on the same run directory is refused at once, naming the holder
    second = cluster.sbatch(script, wait=True, cwd=root, env=job_env(cluster), timeout=120)
    assert second.returncode == 2, f"{second!r}\n{logs(run_dir)}"
    refused = (run_dir / "logs" / f"slurm-{NAME}-{second.job_id}.out").read_text()
    assert f"another launch is training this run directory: SLURM job {first.job_id}" in refused, refused

    wait_for("stage 1 step 10", lambda: re.search(r"stage 1(/\d+)? step 10/", stage_log(run_dir, 1)), cluster, first.job_id,
             run_dir)
    cluster.scancel(first.job_id)
    assert cluster.wait_job(first.job_id, timeout=60) == "CANCELLED"
    deadline = time.monotonic() + 20
    while cluster.leftover_job_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.leftover_job_pids() == []
    # normally stage 1 (steps 11-18); on a very busy machine the cancel may land in stage 2
    stage = 1 if (run_dir / "checkpoints" / "stage-1" / "STOPPED").exists() else 2
    stopped = json.loads((run_dir / "checkpoints" / f"stage-{stage}" / "STOPPED").read_text())
    # run.sbatch stops the step with USR1 on a TERM (srun would kill the step on TERM); scancel may
    # also reach the stage directly with TERM first
    assert stopped["signal"] in ("SIGTERM", "SIGUSR1", "peer"), stopped
    assert complete_checkpoints(run_dir, stage) == [stopped["step"]]  # checkpoint_every = 1000: the signal's checkpoint
    assert not (run_dir / "checkpoints" / f"stage-{stage}" / "final").exists()
    out = (run_dir / "logs" / f"slurm-{NAME}-{first.job_id}.out").read_text()
    assert "got TERM" in out, out

    third = cluster.sbatch(script, wait=True, cwd=root, env=job_env(cluster))
    assert third.returncode == 0, f"{third!r}\n{logs(run_dir)}"
    assert_finished(run_dir)
    step = stopped["step"]
    resumed = f"resumed stage {stage} from {run_dir.resolve()}/checkpoints/stage-{stage}/step-{step:08d} at step {step}"
    assert resumed in stage_log(run_dir, stage)
    assert [m["stage"] for m in metrics(run_dir) if m.get("event") == "stage_start"] == [1, 2]
    assert_same_export(uninterrupted[1], run_dir)


def test_time_limit_requeues_and_completes(cluster: TwoNodeSlurmCluster, corpus: Path, uninterrupted, tmp_path: Path):
    root = tmp_path / "project-c"
    run_dir = compile_run(root, corpus, cluster)
    # Stage 1 holds after step 5 until it is told to stop (STEPC_FAULT_HOLD_AFTER_STEP, runtime/loop/faults.py).
    # Once it is held, the job's time limit is cut to 60-120 s from now: SLURM itself then sends the
    # batch shell its warning (--signal=B:USR1@90) at its next limit check (about every 30 s), mid-stage
    # however slow the machine was to get there, with at least 30 s left to checkpoint and requeue.
    held = tmp_path / "held"
    env = {**job_env(cluster), "STEPC_FAULT_HOLD_AFTER_STEP": "1:5", "STEPC_FAULT_HOLD_FILE": str(held)}
    job = cluster.sbatch("runs/" + NAME + "/run.sbatch", "--signal=B:USR1@90", wait=False, cwd=root, env=env)
    assert job.returncode == 0 and job.job_id is not None, job
    wait_for("stage 1 held at step 5", lambda: Path(f"{held}.rank0").exists(), cluster, job.job_id, run_dir, timeout=300)
    elapsed = _seconds(cluster.job_info(job.job_id)["RunTime"])
    cluster.run("scontrol", "update", f"JobId={job.job_id}", f"TimeLimit={-(-(elapsed + 60) // 60)}")
    out = run_dir / "logs" / f"slurm-{NAME}-{job.job_id}.out"
    deadline = time.monotonic() + 300
    again = False
    while int(cluster.job_info(job.job_id).get("Restarts", 0)) < 1:
        state = cluster.job_state(job.job_id)
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), f"job {job.job_id} {state}\n{logs(run_dir)}"
        assert time.monotonic() < deadline, f"no requeue after 300 s\n{logs(run_dir)}"
        if not again and out.exists() and "near its time limit" in out.read_text():
            # a second warning while the stage checkpoints (a user's scancel --signal=USR1 --batch, or
            # SLURM's own arriving after one) must not kill the batch shell: the job would FAIL, not requeue
            cluster.run("scancel", "--signal=USR1", "--batch", str(job.job_id), check=False)
            again = True
        time.sleep(0.3)
    # requeued: let the next incarnation finish (on a busy machine a 2-minute job makes little progress each time)
    cluster.run("scontrol", "update", f"JobId={job.job_id}", "TimeLimit=00:15:00")
    state = cluster.wait_job(job.job_id, timeout=600, poll=1.0, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    info = cluster.job_info(job.job_id)
    assert state == "COMPLETED", f"{info}\n{logs(run_dir)}"
    stops = [m for m in metrics(run_dir) if m["event"] == "stopped"]
    assert [(m["stage"], m["step"], m["signal"]) for m in stops] == [(1, 5, "SIGUSR1")], stops
    log = stage_log(run_dir, 1)
    assert re.search(r"job \d+ \(restart 1\) stage 1/2", log), log[-2000:]
    assert f"resumed stage 1 from {run_dir.resolve()}/checkpoints/stage-1/step-00000005 at step 5" in log, log[-2000:]
    assert_finished(run_dir)
    assert_same_export(uninterrupted[1], run_dir)


def test_two_launches_on_one_node_at_once_and_submit_chain(cluster: TwoNodeSlurmCluster, corpus: Path, tmp_path: Path):
    node = cluster.nodes[0]
    plain = compile_run(tmp_path / "p1", corpus, cluster, nnodes=1, name="solo")
    chained = compile_run(tmp_path / "p2", corpus, cluster, nnodes=1, name="chain")
    other = cluster.nodes[1]
    cluster.run("scontrol", "update", f"nodename={other}", "state=drain", "reason=stepc-test")  # both on one head node
    try:
        first = cluster.sbatch("runs/solo/run.sbatch", wait=False, cwd=tmp_path / "p1", env=job_env(cluster))
        assert first.returncode == 0, first
        sub = subprocess.run([sys.executable, "-m", "stepc.cli", "submit", "runs/chain", "--chain"], cwd=tmp_path / "p2",
                             env=cluster.client_env(job_env(cluster)), capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr
        ids = [int(j) for j in re.search(r"jobs ([\d ]+)$", sub.stdout.strip()).group(1).split()]
        assert len(ids) == 2, sub.stdout
        assert f"afterok:{ids[0]}" in cluster.job_info(ids[1]).get("Dependency", "")
        both_running = False
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            states = [cluster.job_state(j) for j in (first.job_id, *ids)]
            both_running |= states[0] == "RUNNING" and states[1] == "RUNNING"
            if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states):
                break
            time.sleep(0.5)
    finally:
        cluster.run("scontrol", "update", f"nodename={other}", "state=resume", check=False)
    assert states == ["COMPLETED"] * 3, f"{states}\n{logs(plain)}\n{logs(chained)}"
    assert both_running, "the two launches never ran at the same time"
    for run_dir in (plain, chained):
        assert_finished(run_dir)
    ports = {re.search(r"rendezvous \S+:(\d+)", stage_log(d, 1)).group(1) for d in (plain, chained)}
    assert len(ports) == 2, ports
    assert {cluster.job_info(j)["NodeList"] for j in (first.job_id, ids[0])} == {node}
    names = sorted(p.name for p in (chained / "logs").glob("slurm-*.out"))
    assert names == [f"slurm-chain-stage-1-{ids[0]}.out", f"slurm-chain-stage-2-{ids[1]}.out"], names
    s1 = (chained / "logs" / names[0]).read_text()
    assert "stages 1 of run chain done" in s1 and "stage 2 of 2" not in s1
