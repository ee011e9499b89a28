"""Reliability: bad input, interruptions and tampering never lose work or produce a wrong run.

1. Tampering and drift at resume: an edited stage script, changed data files, a different
   torch/stepc version -> the stage script refuses with exit 2, says what differs and names the
   --allow-* flag; the flag (where tested) lets it proceed.
2. Faults, in one partial run: STEPC_FAULT_NONFINITE_AT_STEP=N (a fault-injection hook in train.py)
   makes step N's loss NaN: the stage stops, keeps the last good checkpoint, records the step in
   metrics.jsonl; the resume meets an injected CUDA OOM (exit 2, the keys that fit), the next ones
   changed data (item 1) and a changed block layout only the workers see; the last one finishes.
3. Disk and permissions: an unwritable --out refuses with exit 2 and writes nothing; a disk that
   fills up during a checkpoint (a small tmpfs, root only) fails naming the checkpoint, keeps the
   previous one intact, leaves no partial checkpoint that could be picked, and a rerun resumes.

Every torchrun job here runs 1 rank, stage 1 of a 6-step stage (checkpoints at steps 2 and 4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STAGE_TIMEOUT, check_ok, read_metrics, run_stage, stage_env
from conftest import tmpfs as _tmpfs

from stepc.cli import main as stepc
from stepc.compiler.manifest import content_hash, dumps
from stepc.runtime.loop.checkpoint import is_complete, newest_complete, step_dir

FAULT = "STEPC_FAULT_NONFINITE_AT_STEP"
# Stage 1 = 6 steps of 4 sequences on 1 rank; checkpoints at steps 2 and 4; evals only at the end.
FAST = {"train": {"reference_steps": 8, "micro_batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 3,
                  "warmup_steps": 1},
        "eval": {"every_steps": 100, "max_tokens": 512},
        "launch": {"nproc_per_node": 1}}


@pytest.fixture
def corpus(tmp_path, small_corpus) -> Path:
    """A private copy of the small corpus: these tests edit data files."""
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)
    return root


@pytest.fixture
def fast_run(make_run, corpus):
    """compile(name, **overrides): the fast 1-rank spec on the private corpus, compiled."""
    def compile(name: str = "rel", **overrides):
        tables = {k: dict(v) for k, v in FAST.items()}
        tables["data"] = {"train": [str(corpus / "train" / "*.txt")]}
        tables["data__validation"] = {"play": str(corpus / "validation" / "*.txt")}
        for table, values in overrides.items():
            tables.setdefault(table, {}).update(values)
        return make_run.compile(name, **tables)
    return compile


def _stage1(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "stage-1"


def _steps(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.glob("step-*")) if stage_dir.is_dir() else []


def _preflight(run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepc.runtime", "--preflight", "--manifest", str(run_dir / "manifest.json"),
                           "--stage", "1", *flags], env=stage_env(), cwd=run_dir, capture_output=True, text=True, timeout=60)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, \
        f"expected a refusal (exit 2), got {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in the refusal:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def _resumed_from(proc: subprocess.CompletedProcess, stage_dir: Path, step: int) -> None:
    expected = f"resumed stage 1 from {step_dir(stage_dir, step)} at step {step}"
    assert expected in proc.stdout, f"{expected!r} not in\n{proc.stdout[-3000:]}"


def _finished(run_dir: Path) -> None:
    stage_dir = _stage1(run_dir)
    assert (stage_dir / "final" / "EXPORT_COMPLETE").is_file()
    train = [m for m in read_metrics(run_dir) if m["event"] == "train" and m["stage"] == 1]
    assert train and train[-1]["step"] == 6, train


# ----------------------------------------------------------------------------- 1. tampering and drift

def test_edited_stage_script_is_refused_and_verify_names_it(fast_run, capsys):
    run_dir = fast_run()
    with open(run_dir / "stage-1.sh", "a") as handle:
        handle.write("# a harmless-looking edit\n")
    err = _refused(run_stage(run_dir, 1, timeout=60), "stage-1.sh", "differs from the script the manifest records",
                   "stepc verify", "--allow-edited-scripts")
    assert str(run_dir / "stage-1.sh") in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()

    capsys.readouterr()
    assert stepc(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "stage-1.sh: content differs from the hash recorded in manifest.json" in out and "FAILED" in out
    assert "stage-2.sh" not in out  # only the edited file is named

    assert _preflight(run_dir, "--allow-edited-scripts").returncode == 0  # the explicit override is honoured


def _rewrite_manifest(run_dir: Path, edit) -> dict:
    """Edit the manifest and recompute its content hash, so only the edited field differs."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["hash"] = content_hash(manifest)
    path.write_text(dumps(manifest))
    return manifest


def test_version_change_at_resume_is_refused_and_diff_reports_it(fast_run, tmp_path, capsys):
    import torch

    from stepc import __version__

    run_dir = fast_run()
    original = tmp_path / "original-manifest.json"
    shutil.copy(run_dir / "manifest.json", original)

    _rewrite_manifest(run_dir, lambda m: m["environment"].__setitem__("torch", "1.0.0"))
    assert _preflight(run_dir).returncode == 2
    _refused(run_stage(run_dir, 1, timeout=60), "different versions", f"torch 1.0.0 -> {torch.__version__}",
             "--allow-version-change")
    assert not (run_dir / "checkpoints").exists()
    assert _preflight(run_dir, "--allow-version-change").returncode == 0

    capsys.readouterr()
    assert stepc(["diff", str(original), str(run_dir / "manifest.json")]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("environment"), out  # nothing but the environment differs
    assert f'  environment.torch: "{torch.__version__}" -> "1.0.0"' in lines, out

    # A different stepc version is refused the same way (both versions named).
    shutil.copy(original, run_dir / "manifest.json")
    _rewrite_manifest(run_dir, lambda m: m.__setitem__("stepc_version", "0.0.0"))
    _refused(run_stage(run_dir, 1, timeout=60), f"stepc 0.0.0 -> {__version__}", "--allow-version-change")
    assert stepc(["diff", str(original), str(run_dir / "manifest.json")]) == 1
    assert f'stepc_version: "{__version__}" -> "0.0.0"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2. faults

def test_faults_and_drift_at_resume_keep_the_last_good_checkpoint(fast_run, corpus, monkeypatch):
    """One run through every failure of a partial stage (each launch costs ~10 s of process start-up, so
    they share one): a non-finite loss, then a CUDA out-of-memory on the resume, then changed data and a
    changed block layout at the next resumes; each keeps checkpoint 2 and the last resume finishes."""
    run_dir = fast_run()
    stage_dir = _stage1(run_dir)
    # --- a non-finite loss: the stage stops, nothing at or after that step is written
    monkeypatch.setenv(FAULT, "4")  # step 4 is a checkpoint step: its checkpoint must not be written
    proc = run_stage(run_dir, 1)
    monkeypatch.delenv(FAULT)
    assert proc.returncode == 2, proc.stdout[-2000:]  # a diagnosis (FAILED record), not torchrun's 1
    assert "error: non-finite loss nan at stage 1 step 4" in proc.stderr, proc.stderr[-4000:]
    assert "the last good checkpoint is kept" in proc.stderr

    assert _steps(stage_dir) == ["step-00000002"], _steps(stage_dir)  # nothing at or after step 4, no .tmp
    assert is_complete(step_dir(stage_dir, 2)) == (True, "")
    assert newest_complete(stage_dir) == (2, step_dir(stage_dir, 2))
    assert not (stage_dir / "final").exists()
    metrics = read_metrics(run_dir)
    faults = [m for m in metrics if m["event"] == "nonfinite_loss"]
    assert len(faults) == 1 and faults[0]["step"] == 4 and faults[0]["stage"] == 1, faults
    assert not [m for m in metrics if m["event"] == "train" and m["step"] >= 4]
    assert (run_dir / "data-fingerprint.json").is_file()

    # --- out of memory in the resumed stage: torchrun reports any failed worker as exit code 1; the stage
    # script must still exit 2 (a diagnosis: the message names the fix), the checkpoint stays intact
    monkeypatch.setenv("STEPC_FAULT_OOM_AT_STEP", "3")
    proc = run_stage(run_dir, 1)
    monkeypatch.delenv("STEPC_FAULT_OOM_AT_STEP")
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    _resumed_from(proc, stage_dir, 2)
    assert "error: CUDA out of memory at stage 1 step 3: the plan predicted a peak of" in proc.stderr, proc.stderr[-4000:]
    for key in ("train.micro_batch_size", "train.activation_checkpointing", "train.compile"):
        assert key in proc.stderr
    assert f"The last complete checkpoint {step_dir(stage_dir, 2)} is kept." in proc.stderr
    assert "Traceback" not in proc.stderr and "Root Cause" not in proc.stderr  # nor torchrun's failure report
    assert "torchrun: worker rank 0 (local rank 0" in proc.stderr and "exited with code 2" in proc.stderr
    assert json.loads((stage_dir / "FAILED").read_text())["exit_code"] == 2
    assert _steps(stage_dir) == ["step-00000002"] and is_complete(step_dir(stage_dir, 2)) == (True, "")

    # --- changed data at the next resume: refused before torchrun, then allowed
    edited = corpus / "train" / "tempest.txt"
    original = edited.read_bytes()
    with open(edited, "a") as handle:
        handle.write("\nEnter a new scene that was not there before.\n")
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    err = _refused(run_stage(run_dir, 1, timeout=60), "data fingerprint mismatch", "--allow-data-change",
                   str(edited), "data-fingerprint.json")
    assert "changed size" in err
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # refused before anything ran
    assert _steps(stage_dir) == ["step-00000002"]

    # Same size, different content: still refused (the check hashes, it does not trust sizes).
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x20  # swap one letter's case
    edited.write_bytes(bytes(flipped))
    _refused(run_stage(run_dir, 1, timeout=60), "data fingerprint mismatch", "changed content", "--allow-data-change")

    # A damaged record is named, never a traceback (pydantic's reason, first line only)
    fingerprint = (run_dir / "data-fingerprint.json").read_bytes()
    (run_dir / "data-fingerprint.json").write_text('{"train": {"files": "?"}}')
    err = _refused(run_stage(run_dir, 1, timeout=60), "cannot read the data fingerprint", "--allow-data-change")
    assert "Traceback" not in err
    (run_dir / "data-fingerprint.json").write_bytes(fingerprint)

    # What only the workers see: the files as recorded, the blocks they are cut into not (model.seq_len
    # edited in the manifest, the edit accepted with --allow-edited-manifest). The preflight, which
    # compares the files, passes; the workers, which compare the whole fingerprint, refuse.
    edited.write_bytes(original)
    saved = (run_dir / "manifest.json").read_bytes()
    _rewrite_manifest(run_dir, lambda m: m["spec"]["model"].update(seq_len=32))
    monkeypatch.chdir(run_dir)  # where the stage script prepares from (the relative [data] cache_dir)
    assert stepc(["data", "prepare", str(run_dir), "--quiet"]) == 0
    assert _preflight(run_dir, "--allow-edited-manifest").returncode == 0
    err = _refused(run_stage(run_dir, 1, "--allow-edited-manifest", timeout=120), "data fingerprint mismatch",
                   "num_blocks, seq_len", "--allow-data-change")
    assert "torchrun: worker rank 0" in err  # refused by a worker, after torchrun started
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before and _steps(stage_dir) == ["step-00000002"]
    (run_dir / "manifest.json").write_bytes(saved)
    edited.write_bytes(bytes(flipped))

    # the flag the refusal names, given to `stepc run` (it passes it to the stage script)
    proc = check_ok(subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_dir), "--stage", "1",
                                    "--allow-data-change"], env=stage_env(), cwd=run_dir, capture_output=True,
                                   text=True, timeout=STAGE_TIMEOUT))
    _resumed_from(proc, stage_dir, 2)
    assert not (stage_dir / "FAILED").exists()  # the rerun's stage script cleared the failure record
    _finished(run_dir)


# ----------------------------------------------------------------------------- 3. disk and permissions

def test_compile_into_unwritable_out_exits_2_and_writes_nothing(make_run, tmp_path, capsys):
    spec = make_run.spec("rt")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a directory\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert stepc(["compile", str(spec), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot create the run directory" in err and "Not a directory" in err, err
    assert "fix: choose a writable --out directory" in err and "Traceback" not in err
    assert blocker.read_text() == "a regular file, not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_compile_onto_read_only_filesystem_exits_2(make_run, tmp_path, capsys):
    spec = make_run.spec("rt")
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        capsys.readouterr()
        assert stepc(["compile", str(spec), "--out", str(ro / "runs")]) == 2
        err = capsys.readouterr().err
        assert "cannot create the run directory" in err and "Read-only file system" in err, err
        assert list(ro.iterdir()) == []


def test_disk_full_during_checkpoint_keeps_previous_and_resumes(fast_run):
    run_dir = fast_run()
    stage_dir = _stage1(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    state = manifest["plan"]["stages"][0]["exact_model_state_bytes"]
    # A checkpoint (weights + AdamW moments) is ~0.8x the model states (which add gradients): leave room
    # for one checkpoint but not two (a new checkpoint is written before the old ones are pruned).
    room = int(1.25 * state)
    with _tmpfs(run_dir / "checkpoints", "size=32m") as disk:
        ballast = disk / "ballast"
        vfs = os.statvfs(disk)
        with open(ballast, "wb") as handle:
            handle.truncate(0)
            handle.write(b"\0" * (vfs.f_bavail * vfs.f_frsize - room))
        proc = run_stage(run_dir, 1)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert _steps(stage_dir), f"the first checkpoint did not fit in {room} bytes:\n{proc.stderr[-3000:]}"
        assert f"error: cannot write checkpoint {step_dir(stage_dir, 4)}" in proc.stderr, proc.stderr[-4000:]
        assert "No space left on device" in proc.stderr
        assert f"the last complete checkpoint {step_dir(stage_dir, 2)} is kept" in proc.stderr

        assert is_complete(step_dir(stage_dir, 2)) == (True, "")
        assert _steps(stage_dir) == ["step-00000002"], _steps(stage_dir)  # the partial step-4 .tmp was removed
        assert newest_complete(stage_dir) == (2, step_dir(stage_dir, 2))
        assert not (stage_dir / "final").exists()

        ballast.unlink()  # free the space; the rerun picks up where the intact checkpoint left off
        again = check_ok(run_stage(run_dir, 1, timeout=STAGE_TIMEOUT))
        _resumed_from(again, stage_dir, 2)
        _finished(run_dir)


def test_force_recompile_with_a_different_plan_never_resumes_the_old_checkpoints(tmp_path):
    """`stepc compile --force` keeps checkpoints; a changed spec must not train on top of them."""
    import subprocess
    import sys

    from stepc.cli import main

    spec = tmp_path / "spec.toml"
    base = ('[experiment]\nname = "ident"\n[model]\nhidden_size = 64\nnum_layers = 4\nnum_attention_heads = 4\n'
            'vocab_size = 512\nseq_len = 64\n[memory]\nlayers = {layers}\n[train]\nglobal_batch_tokens = 512\n'
            'micro_batch_size = 1\n[step]\nlora_rank = 8\n[data]\ntokenizer = "bpe-512"\n')

    def preflight():
        return subprocess.run([sys.executable, "-m", "stepc.runtime", "--preflight", "--manifest",
                               str(tmp_path / "runs" / "ident" / "manifest.json"), "--stage", "1"],
                              capture_output=True, text=True, cwd=tmp_path)

    spec.write_text(base.format(layers="[2, 2]"))
    assert main(["compile", str(spec), "--out", str(tmp_path / "runs")]) == 0
    first = preflight()
    assert first.returncode == 0, first.stderr  # records the experiment beside the (future) checkpoints
    spec.write_text(base.format(layers="[3, 1]"))
    assert main(["compile", str(spec), "--out", str(tmp_path / "runs"), "--force"]) == 0
    changed = preflight()
    assert changed.returncode == 2
    assert "different spec or plan" in changed.stderr and "Traceback" not in changed.stderr
    spec.write_text(base.format(layers="[2, 2]"))
    assert main(["compile", str(spec), "--out", str(tmp_path / "runs"), "--force"]) == 0
    assert preflight().returncode == 0  # the original experiment resumes
