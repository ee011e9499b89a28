"""`stepc submit` against a fake sbatch that records its arguments: one job, or a chain of one job per
stage with afterok dependencies; without SLURM a user error. The real cluster runs both in
test_slurm_two_node.py (one- and two-node jobs, a chain) and test_sweep.py (an array)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stepc.cli import main as stepc_main

REPO = Path(__file__).resolve().parent.parent


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
