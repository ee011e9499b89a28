"""`stepc submit` against a fake sbatch that records its arguments: one job, or a chain of one job per
stage with afterok dependencies; without SLURM a user error. The real cluster runs both in
test_slurm_two_node.py (one- and two-node jobs, a chain) and test_sweep.py (an array)."""

from __future__ import annotations

import json
import os
import shutil
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
    assert lines[1] == (f"--parsable --export=ALL {out} --job-name=tiny-cpu-stage-1 {script} | "
                        f"STAGES=1 RUN_DIR={run_dir.resolve()}")
    assert lines[2] == (f"--parsable --export=ALL {out} --job-name=tiny-cpu-stage-2 --dependency=afterok:102 "
                        f"--kill-on-invalid-dep=yes {script} | STAGES=2 RUN_DIR={run_dir.resolve()}")
    assert not list(run_dir.glob("logs/*"))  # nothing added to the run directory


def test_submit_without_slurm_is_a_user_error(tmp_path: Path, monkeypatch, capsys):
    """A run directory and a sweep, each submitted without `sbatch` on PATH: exit 2, the fix names the local command."""
    sweep_dir, _ = _sweep(tmp_path)
    run_dir = _compiled(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for target in (run_dir, sweep_dir):
        capsys.readouterr()
        assert stepc_main(["submit", str(target)]) == 2
        err = capsys.readouterr().err
        assert "SLURM not found: `sbatch` is not on PATH" in err and "fix:" in err and "stepc run" in err, err
        assert "Traceback" not in err


# --- nothing is queued unless it is what was compiled (issue 26.3) ------------------------------------------


def _compiled(tmp_path: Path) -> Path:
    assert stepc_main(["compile", str(REPO / "specs" / "tiny-cpu.toml"), "--out", str(tmp_path / "runs")]) == 0
    return tmp_path / "runs" / "tiny-cpu"


@pytest.mark.parametrize("name", ["run.sbatch", "stage-2.sh"])
def test_submit_refuses_an_edited_script_and_queues_nothing(tmp_path: Path, monkeypatch, capsys, name):
    run_dir = _compiled(tmp_path)
    log = _fake_sbatch(tmp_path, monkeypatch)
    with open(run_dir / name, "a") as script:
        script.write("echo pwned\n")
    capsys.readouterr()
    assert stepc_main(["submit", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {run_dir / name}: {name} differs from the script the manifest records" in err and "fix:" in err, err
    assert not log.exists()  # sbatch never ran


def _sweep(tmp_path: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "runs"
    assert stepc_main(["sweep", str(REPO / "specs" / "tiny-cpu.toml"), "--grid", "train.lr=1e-3,3e-4", "--out", str(out)]) == 0
    sweep_dir = out / "tiny-cpu.sweep"
    return sweep_dir, [out / "tiny-cpu-lr1e-3", out / "tiny-cpu-lr3e-4"]


def _edit_json(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


SWEEP_DAMAGE = {
    "member-lacks-a-stage-script": (lambda s, runs: (runs[1] / "stage-2.sh").unlink(), "stage-2.sh is missing"),
    "member-stage-script-edited": (lambda s, runs: (runs[0] / "stage-1.sh").open("a").write("echo pwned\n"),
                                   "stage-1.sh differs from the script the manifest records"),
    "member-recompiled": (lambda s, runs: stepc_main(["compile", str(REPO / "specs" / "tiny-cpu.toml"), "--set",
                                                      'experiment.name="tiny-cpu-lr3e-4"', "--set", "train.lr=1e-2",
                                                      "--out", str(runs[1].parent), "--force"]),
                          "tiny-cpu-lr3e-4 was recompiled after the sweep"),
    "member-missing": (lambda s, runs: shutil.rmtree(runs[0]), "run directory tiny-cpu-lr1e-3 is missing"),
    "sweep-sbatch-edited": (lambda s, runs: (s / "sweep.sbatch").open("a").write("echo pwned\n"),
                            "sweep.sbatch differs from the file sweep.json records"),
    "sweep-json-edited": (lambda s, runs: _edit_json(s / "sweep.json", lambda r: r["points"].reverse()),
                          "sweep.json was edited after `stepc sweep` wrote it"),
}


@pytest.mark.parametrize("damage", list(SWEEP_DAMAGE))
def test_submit_of_a_sweep_verifies_every_member_and_queues_nothing(tmp_path: Path, monkeypatch, capsys, damage):
    sweep_dir, runs = _sweep(tmp_path)
    log = _fake_sbatch(tmp_path, monkeypatch)
    edit, expected = SWEEP_DAMAGE[damage]
    edit(sweep_dir, runs)
    capsys.readouterr()
    assert stepc_main(["submit", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "fix:" in err and "Traceback" not in err, err
    assert not log.exists()


def test_submit_of_an_intact_sweep_queues_one_array(tmp_path: Path, monkeypatch, capsys):
    sweep_dir, _ = _sweep(tmp_path)
    log = _fake_sbatch(tmp_path, monkeypatch)
    assert stepc_main(["submit", str(sweep_dir)]) == 0
    assert log.read_text().count("\n") == 1 and str((sweep_dir / "sweep.sbatch").resolve()) in log.read_text()


MALFORMED_SWEEP_JSON = {
    "not-json": ("{", "not JSON"),
    "a-list": ("[]", "not a sweep record"),
    "no-points": (json.dumps({"name": "x"}), "[grid]"),
    "point-outside": (None, "[points.0.name]"),
}


@pytest.mark.parametrize("case", list(MALFORMED_SWEEP_JSON))
@pytest.mark.parametrize("command", ["submit", "report"])
def test_a_malformed_sweep_json_is_refused_naming_it(tmp_path: Path, monkeypatch, capsys, case, command):
    sweep_dir, _ = _sweep(tmp_path)
    log = _fake_sbatch(tmp_path, monkeypatch)
    text, expected = MALFORMED_SWEEP_JSON[case]
    if text is None:
        _edit_json(sweep_dir / "sweep.json", lambda r: r["points"][0].update(name="../../elsewhere"))
    else:
        (sweep_dir / "sweep.json").write_text(text)
    capsys.readouterr()
    assert stepc_main([command, str(sweep_dir), *(["--out", str(tmp_path / "report")] if command == "report" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweep_dir / 'sweep.json'}") and expected in err and "fix:" in err, err
    assert "Traceback" not in err and not log.exists() and not (tmp_path / "report").exists()


# --- run.sbatch checks what it is about to run (without a cluster: srun and scontrol are stubs) --------------


STUB_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$SRUN_LOG"
"""


@pytest.mark.parametrize("edit", ["stage-script", "run-sbatch", "submitted-copy"])
def test_run_sbatch_refuses_to_run_an_edited_script(tmp_path: Path, edit):
    """The stage scripts and the manifest in the run directory, and SLURM's copy of run.sbatch ("$0"),
    must be what was compiled when the job starts (it may have waited in the queue for hours)."""
    import subprocess
    import sys

    run_dir = _compiled(tmp_path).resolve()
    script = run_dir / "run.sbatch"
    if edit == "stage-script":
        (run_dir / "stage-2.sh").open("a").write("touch PWNED\n")
        named = f"{run_dir / 'stage-2.sh'}: stage-2.sh differs from the script the manifest records"
    elif edit == "run-sbatch":
        script.open("a").write("touch PWNED\n")
        named = f"{script}: run.sbatch differs from the script the manifest records"
    else:  # sbatch of an edited copy, the run directory untouched (STEPC_RUN_DIR names it)
        script = tmp_path / "slurm_script"
        script.write_text((run_dir / "run.sbatch").read_text() + "touch PWNED\n")
        named = f"{script}: the submitted run.sbatch differs from the one the manifest records"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "SRUN_LOG": str(tmp_path / "srun.log"), "STEPC_RUN_DIR": str(run_dir), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {named}" in proc.stderr and "fix:" in proc.stderr, proc.stderr
    assert not (tmp_path / "srun.log").exists() and not (run_dir / "LOCK").exists()  # nothing ran, nothing was taken
    assert not list(tmp_path.rglob("PWNED"))
