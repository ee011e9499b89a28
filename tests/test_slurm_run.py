"""run.sbatch on a real (one-node) SLURM cluster: all stages in order, cancel + resubmit resumes.

Uses the harness in tests/slurm_cluster.py (munged + slurmctld + slurmd started by the test, state in a
short temp dir). Skipped only when ``slurm_available()`` says a cluster cannot run here (no slurm
binaries: ``bash tests/install_slurm.sh``; not root).

The run is tiny (4 layers of width 64, 2 stages of ~20 steps, 2 CPU ranks) so that the module
takes about 3 minutes; most of it is torch start-up and ``sbatch --wait``'s polling (2 s, 10 s, then
every 32 s).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sys
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import SlurmCluster, slurm_available, slurm_cluster_fixture
except ImportError:  # e.g. --import-mode=importlib: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm_cluster import SlurmCluster, slurm_available, slurm_cluster_fixture

from stepc.cli import main as stepc_main

needs_slurm = pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))

REPO = Path(__file__).resolve().parent.parent
NAME = "slurm-tiny"
CORPUS_FILES = ("phoenix_and_the_turtle.txt", "passionate_pilgrim.txt", "lovers_complaint.txt")

slurm_cluster = slurm_cluster_fixture(scope="session")

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
checkpoint_every = 4

[data]
train = [{train}]
tokenizer = "bpe-512"

[eval]
every_steps = 1000
max_tokens = 4096

[launch]
nnodes = 1
nproc_per_node = 2
rdzv_port = {port}

[launch.slurm]
partition = "{partition}"
time = "00:10:00"
cpus_per_task = 2
gpus_per_node = 0
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def _free_port(span: int = 64) -> int:
    """A base rendezvous port outside the ephemeral range whose next `span` ports are free too: a job
    listens on launch.rdzv_port + job id (mod rdzv_ports), and the test cluster's job ids are small."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(100):
        base = rng.randrange(30000, 32000 - span)
        if all(_port_free(port) for port in range(base, base + span)):
            return base
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3 small corpus files (the built corpus when present, else generated text)."""
    dest = tmp_path_factory.mktemp("corpus")
    source = REPO / "data" / "corpus" / "train"
    for i, name in enumerate(CORPUS_FILES):
        if (source / name).is_file():
            (dest / name).write_bytes((source / name).read_bytes())
        else:  # the corpus is git-ignored and downloaded; any deterministic English-like text will do
            rng = random.Random(i)
            words = ("the of and to in that is was he for it with as his on be at by had not are but from or "
                     "have an they which one you were her all she there would their we him been has when who "
                     "will more no if out so said what up its about into than them can only other new some").split()
            lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(6, 14))).capitalize() + "."
                     for _ in range(600)]
            (dest / name).write_text("\n".join(lines) + "\n")
    return dest


def compile_run(root: Path, corpus: Path, cluster: SlurmCluster) -> Path:
    """Compile the tiny spec into ROOT/runs/<name> (ROOT plays the project root)."""
    root.mkdir(parents=True, exist_ok=True)
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(name=NAME, train=json.dumps(str(corpus / "*.txt")), port=_free_port(),
                                partition=cluster.partition))
    assert stepc_main(["compile", str(spec), "--out", str(root / "runs")]) == 0
    return root / "runs" / NAME


def job_env() -> dict[str, str]:
    """sbatch exports the submitting environment into the job: this interpreter and this checkout."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHON": sys.executable, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def logs(root: Path, run_dir: Path) -> str:
    parts = []
    for f in sorted((run_dir / "logs").glob("slurm-*.out")) + sorted((run_dir / "logs").glob("*.log")):
        parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def complete_checkpoints(run_dir: Path, stage: int) -> list[Path]:
    stage_dir = run_dir / "checkpoints" / f"stage-{stage}"
    return [p for p in sorted(stage_dir.glob("step-*")) if not p.name.endswith(".tmp") and (p / "COMPLETE").is_file()]


def assert_finished(root: Path, run_dir: Path) -> None:
    for stage in (1, 2):
        assert (run_dir / "checkpoints" / f"stage-{stage}" / "final" / "EXPORT_COMPLETE").is_file(), logs(root, run_dir)
        assert (run_dir / "logs" / f"stage-{stage}.slurm.log").is_file()
    assert (run_dir / "export" / "model.safetensors").is_file()
    ends = [m["stage"] for m in metrics(run_dir) if m.get("event") == "stage_end"]
    assert ends == [1, 2], ends


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, corpus: Path, tmp_path_factory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("project-a")
    run_dir = compile_run(root, corpus, slurm_cluster)
    # as a user would: from the project root, a relative script path
    result = slurm_cluster.sbatch("runs/" + NAME + "/run.sbatch", wait=True, cwd=root, env=job_env())
    return root, run_dir, result


@needs_slurm
def test_sbatch_runs_every_stage_in_order(slurm_cluster: SlurmCluster, uninterrupted):
    root, run_dir, result = uninterrupted
    assert result.returncode == 0, f"{result!r}\n{logs(root, run_dir)}"
    info = slurm_cluster.job_info(result.job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
    assert info["Requeue"] == "1"
    assert_finished(root, run_dir)
    out = (run_dir / "logs" / f"slurm-{NAME}-{result.job_id}.out").read_text()
    assert not list(root.glob("slurm-*.out"))  # never in the project root (the submit directory)
    assert "stage 1 of 2" in out and "stage 2 of 2" in out and out.index("stage 1 of 2") < out.index("stage 2 of 2")
    log = (run_dir / "logs" / "stage-1.slurm.log").read_text()
    assert f"job {result.job_id} (restart 0) stage 1/2" in log
    assert re.search(r"rendezvous \S+:\d+", log), log[:500]


@needs_slurm
def test_cancel_and_resubmit_resumes(slurm_cluster: SlurmCluster, corpus: Path, uninterrupted, tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    root = tmp_path / "project-b"
    run_dir = compile_run(root, corpus, slurm_cluster)
    script = "runs/" + NAME + "/run.sbatch"
    first = slurm_cluster.sbatch(script, wait=False, cwd=root, env=job_env())
    assert first.returncode == 0 and first.job_id is not None, first
    deadline = time.monotonic() + 150
    while not complete_checkpoints(run_dir, 1):
        state = slurm_cluster.job_state(first.job_id)
        assert state in ("PENDING", "RUNNING"), f"job {first.job_id} is {state}\n{logs(root, run_dir)}"
        assert time.monotonic() < deadline, "no complete stage-1 checkpoint after 150 s\n" + logs(root, run_dir)
        time.sleep(0.2)
    slurm_cluster.scancel(first.job_id)
    assert slurm_cluster.wait_job(first.job_id, timeout=60) == "CANCELLED"
    assert not (run_dir / "checkpoints" / "stage-1" / "final").exists(), "cancelled too late: stage 1 had finished"
    deadline = time.monotonic() + 15
    while slurm_cluster.leftover_job_pids() and time.monotonic() < deadline:  # torchrun and its workers are gone
        time.sleep(0.2)
    assert slurm_cluster.leftover_job_pids() == []
    out = (run_dir / "logs" / f"slurm-{NAME}-{first.job_id}.out").read_text()
    assert "got TERM" in out, out

    second = slurm_cluster.sbatch(script, wait=True, cwd=root, env=job_env())
    assert second.returncode == 0, f"{second!r}\n{logs(root, run_dir)}"
    assert slurm_cluster.job_state(second.job_id) == "COMPLETED"
    assert_finished(root, run_dir)
    log = (run_dir / "logs" / "stage-1.slurm.log").read_text()
    resumed = re.findall(r"resumed stage 1 from (\S+) at step (\d+)", log)
    assert resumed and int(resumed[-1][1]) > 0, log[-3000:]
    events = metrics(run_dir)
    assert [m["stage"] for m in events if m.get("event") == "stage_start"] == [1, 2]  # stage 1 never restarted from 0

    _, reference_dir, reference = uninterrupted
    assert reference.returncode == 0
    a = load_file(str(reference_dir / "export" / "model.safetensors"))
    b = load_file(str(run_dir / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed export differs from the uninterrupted one in {differ}"


# ----------------------------------------------------------------------------- stepc.commands.submit (fake sbatch)


FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(wc -l < "$FAKE_LOG" 2> /dev/null || echo 0) + 101 ))
echo "$* | STAGES=${STEPC_STAGES:-all} RUN_DIR=$STEPC_RUN_DIR" >> "$FAKE_LOG"
echo "$n"
"""


def _fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("STEPC_STAGES", "2")  # left over in the user's shell: must not leak into a plain submit
    return log


def test_submit_one_job_or_a_chain(tmp_path: Path, monkeypatch, capsys):
    from stepc.commands.submit import submit

    assert stepc_main(["compile", str(REPO / "specs" / "tiny-cpu.toml"), "--out", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "tiny-cpu"
    log = _fake_sbatch(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert submit(Path("runs/tiny-cpu"), chain=False) == ["101"]
    assert submit(Path("runs/tiny-cpu"), chain=True) == ["102", "103"]
    lines = log.read_text().splitlines()
    script = str(run_dir.resolve() / "run.sbatch")
    out = f"--output={run_dir.resolve()}/logs/slurm-%x-%j.out"
    assert lines[0] == f"--parsable --export=ALL {out} {script} | STAGES=all RUN_DIR={run_dir.resolve()}"
    assert lines[1] == f"--parsable --export=ALL {out} --job-name=tiny-cpu-stage-1 {script} | STAGES=1 RUN_DIR={run_dir.resolve()}"
    assert lines[2] == (f"--parsable --export=ALL {out} --job-name=tiny-cpu-stage-2 --dependency=afterok:102 "
                        f"--kill-on-invalid-dep=yes {script} | STAGES=2 RUN_DIR={run_dir.resolve()}")
    assert not list(run_dir.glob("logs/*"))  # nothing added to the run directory


def test_submit_without_slurm_is_a_user_error(tmp_path: Path, monkeypatch):
    from stepc.commands.submit import submit
    from stepc.errors import UserError

    assert stepc_main(["compile", str(REPO / "specs" / "tiny-cpu.toml"), "--out", str(tmp_path / "runs")]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError) as err:
        submit(tmp_path / "runs" / "tiny-cpu", chain=False)
    assert "SLURM not found" in str(err.value) and err.value.fix
