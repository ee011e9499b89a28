"""Bad input, third pass (issue 26): mistakes that show only at run time exit 2 with the path and the fix.

Tracker targets (a file, a read-only disk, an MLflow store this MLflow cannot use, a server nobody
answers), the run directory's own outputs (a symlink loop), `stepc eval` on a read-only run directory
(the numbers are printed before the save fails). Each case runs the real command or stage script and
asserts: exit 2, the path, a fix, no traceback. The stage-script refusals come from the preflight,
before torchrun, so they cost no training; the session's finished run (conftest.full_run) provides an
export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_stage, stage_env, tmpfs

from stepc.cli import main
from stepc.errors import UserError
from stepc.runtime.loop import tracking

ONE_RANK = {"launch": {"nproc_per_node": 1}, "eval": {"every_steps": 100, "max_tokens": 512},
            "train": {"micro_batch_size": 4, "reference_steps": 8, "warmup_steps": 1, "checkpoint_every": 4}}


def refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The contract: exit 2, every expected text in stderr, a fix, no traceback; returns stderr."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def stepc(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=stage_env())


@pytest.fixture(scope="module")
def trained(full_run) -> Path:
    """The session's finished run (conftest.full_run, built once for many test files): its export is what
    `stepc eval` scores. Read-only: tests copy it."""
    return full_run


# ------------------------------------------------------------------------------------- trackers


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_tracker_directory_that_is_a_file_stops_the_stage_before_torchrun(make_run, backend):
    run_dir = make_run.compile("trk", log={"backends": [backend]}, **ONE_RANK)
    target = run_dir / ("tensorboard" if backend == "tensorboard" else "mlartifacts")  # MLflow's SQLite store's artifacts
    target.write_text("not a directory\n")
    err = refused(run_stage(run_dir, 1, timeout=120), f"{target}, which is not a directory",
                  f"remove or move {target}")
    assert "torchrun" not in err and not (run_dir / "checkpoints" / "stage-1").exists()
    assert target.read_text() == "not a directory\n"


def test_an_mlflow_database_that_is_a_directory_stops_the_stage_before_torchrun(make_run):
    run_dir = make_run.compile("trk", log={"backends": ["mlflow"]}, **ONE_RANK)
    (run_dir / "mlflow.db").mkdir()
    err = refused(run_stage(run_dir, 1, timeout=120), f"[log.backends]: the MLflow SQLite database {run_dir / 'mlflow.db'} "
                  "is a directory", f"remove or move {run_dir / 'mlflow.db'}")
    assert "torchrun" not in err and not (run_dir / "checkpoints" / "stage-1").exists()


def test_a_read_only_tracker_directory_stops_the_stage_before_torchrun(make_run):
    run_dir = make_run.compile("trk", log={"backends": ["tensorboard"]}, **ONE_RANK)
    with tmpfs(run_dir / "tensorboard", "size=1m,ro"):
        refused(run_stage(run_dir, 1, timeout=120), f"{run_dir / 'tensorboard'}, which cannot be written (Read-only file system)",
                f"make {run_dir / 'tensorboard'} writable")
    assert not (run_dir / "checkpoints" / "stage-1").exists()


def test_an_mlflow_file_store_of_the_users_choice_is_used(make_run, tmp_path):
    """MLflow 3 refuses file stores unless opted in; stepc opts in for its default and for the user's own."""
    store = tmp_path / "my store"
    run_dir = make_run.compile("trk", log={"backends": ["mlflow"], "mlflow_tracking_uri": str(store)}, **ONE_RANK)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    probe = ("import sys; from pathlib import Path; from stepc.runtime.loop.tracking import open_tracking\n"
             "t = open_tracking(Path(sys.argv[1]), 1, 0)\n"
             "t({'event': 'train', 'stage': 1, 'step': 1, 'loss': 2.5}); t.close()")
    proc = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(store.glob("*/*/metrics/train/loss")), sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))[:20]


@pytest.mark.parametrize("uri, expected", [
    ("htp://mlflow:5000", "unknown scheme 'htp'"),
    ("http://", "no host in the URL"),
    ("sqlite:///mlflow.db", "needs SQLAlchemy"),
    ("postgresql://u@db/mlflow", "needs SQLAlchemy"),
    (None, "the default SQLite store (RUN_DIR/mlflow.db), which needs SQLAlchemy"),  # mlflow-skinny alone
    ("sqlite://", "in-memory SQLite database"),
    ("sqlite:///{tmp}", "is a directory, not a file"),
])
def test_an_mlflow_uri_this_mlflow_cannot_store_to_is_refused_at_compile_time(make_run, capsys, monkeypatch, tmp_path,
                                                                              uri, expected):
    real = importlib.util.find_spec
    if "SQLAlchemy" in expected:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    log = {"backends": ["mlflow"], **({"mlflow_tracking_uri": uri.format(tmp=tmp_path)} if uri else {})}
    spec = make_run.spec("trk", log=log)
    assert main(["compile", str(spec), "--out", str(make_run.root / "out")]) == 2
    err = capsys.readouterr().err
    key = "log.mlflow_tracking_uri" if uri else "log.backends"
    assert f"{spec}: [{key}]: " in err and expected in err and "fix:" in err, err
    assert not (make_run.root / "out").exists()


def test_an_mlflow_file_store_that_is_a_file_is_refused_at_compile_time(make_run, capsys, tmp_path):
    store = tmp_path / "store"
    store.write_text("x")
    spec = make_run.spec("trk", log={"backends": ["mlflow"], "mlflow_tracking_uri": store.as_uri()})
    assert main(["compile", str(spec), "--out", str(make_run.root / "out")]) == 2
    err = capsys.readouterr().err
    assert f"[log.mlflow_tracking_uri]: the MLflow file store {store} is a file" in err and "fix:" in err, err


def test_an_mlflow_server_nobody_answers_stops_the_stage_at_once(make_run):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = make_run.compile("trk", log={"backends": ["mlflow"], "mlflow_tracking_uri": f"http://127.0.0.1:{port}"},
                               **ONE_RANK)
    started = time.monotonic()
    err = refused(run_stage(run_dir, 1, timeout=120), f"[log.mlflow_tracking_uri]: the MLflow tracking server "
                  f"http://127.0.0.1:{port} does not answer", "start the server")
    assert time.monotonic() - started < 60 and err.count("error:") == 1


def test_an_mlflow_server_that_never_replies_is_given_up_after_the_bounded_wait(monkeypatch, tmp_path):
    """A server that accepts the connection and never answers: one bounded wait, then one message."""
    from stepc.schema.spec import Log

    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes connections into the backlog; nobody reads them
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserError, match="does not answer .*waited at most 1 s"):
            tracking.check_targets(tmp_path, Log(backends=["mlflow"], mlflow_tracking_uri=uri), "manifest.json")
        assert time.monotonic() - started < 10


# ------------------------------------------------------------------------- run directory outputs


def test_checkpoints_as_a_symlink_loop_stops_the_stage_before_torchrun(make_run):
    run_dir = make_run.compile("loop", **ONE_RANK)
    (run_dir / "checkpoints").symlink_to(run_dir / "checkpoints")
    refused(run_stage(run_dir, 1, timeout=120), f"{run_dir / 'checkpoints'}: checkpoints is a symbolic link loop",
            f"remove {run_dir / 'checkpoints'} or point it at a directory")
    assert (run_dir / "checkpoints").is_symlink()


def test_eval_on_a_read_only_run_directory_prints_the_perplexity_then_exits_2(trained, tmp_path):
    with tmpfs(tmp_path / "ro", "size=64m") as disk:
        run_dir = disk / trained.name
        shutil.copytree(trained, run_dir, symlinks=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = stepc("eval", str(run_dir), cwd=run_dir)
        err = refused(proc, f"{run_dir / 'eval.json'}: the results above could not be saved: Read-only file system",
                      "make the run directory writable")
        scored = [line for line in proc.stdout.splitlines() if line.startswith("perplexity ")]
        assert [line.split(":")[0] for line in scored] == ["perplexity heldout", "perplexity play"], proc.stdout
        assert all(float(line.split(": ")[1]) > 1 for line in scored)
        assert not (run_dir / "eval.json").exists() and err.count("error:") == 1


# ------------------------------------------------------------------------------ manifest schema


@pytest.mark.parametrize("schema", [2, "1"])
def test_a_manifest_of_another_schema_is_refused_by_every_command_that_reads_it(trained, tmp_path, schema):
    """Re-sealed (its content hash matches), so only the schema is wrong: `stepc verify` used to be the
    only command to notice; `run --stage 2` trained it."""
    from stepc.compiler.manifest import dumps
    from stepc.hashing import content_hash

    run_dir = tmp_path / "other-schema"
    shutil.copytree(trained, run_dir, symlinks=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["schema"] = schema
    manifest["hash"] = content_hash(manifest)
    (run_dir / "manifest.json").write_text(dumps(manifest))
    before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    said = f"schema is {json.dumps(schema)}, but this stepc reads manifest schema 1"
    for args in (["run", str(run_dir), "--stage", "2"], ["eval", str(run_dir)],
                 ["report", str(run_dir), "--out", str(tmp_path / "report")], ["data", "prepare", str(run_dir)]):
        refused(stepc(*args, cwd=run_dir), f"{run_dir / 'manifest.json'}: [schema]: {said}", "recompile the run's spec")
    err = refused(run_stage(run_dir, 2, timeout=120), said)  # the stage script, before torchrun
    assert "torchrun" not in err
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before
    assert not (tmp_path / "report").exists()


# ------------------------------------------------------------------------------ data preparation


def test_data_prepare_on_a_read_only_run_directory_is_refused_before_tokenising(trained, tmp_path):
    with tmpfs(tmp_path / "ro", "size=64m") as disk:
        run_dir = disk / trained.name
        shutil.copytree(trained, run_dir, symlinks=True)
        (run_dir / "data-index.json").unlink()  # so the index must be written again
        shutil.rmtree(run_dir / ".cache")  # and the data tokenised again: it must not start
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = stepc("data", "prepare", str(run_dir), cwd=tmp_path)
        err = refused(proc, f"{run_dir / 'data-index.json'}: cannot write the run directory's data index: Read-only file system",
                      "make the run directory writable")
        assert "units tokenised" not in err and "preparing" not in err


@pytest.mark.parametrize("size, where", [("8k", "cache: "), ("96k", "cache/shards/")])
def test_data_prepare_with_a_full_cache_disk_names_it_and_leaves_no_partial_shard(make_run, tmp_path, size, where):
    """8k: the disk fills while the tokenizer and file hashes are saved (this process); 96k: while the
    shards are written (the tokeniser workers, or this process with one worker)."""
    with tmpfs(tmp_path / "full", f"size={size}") as disk:
        spec = make_run.spec("full", data={"train": [str(make_run.corpus / "train" / "*.txt")], "tokenizer": "bpe-512",
                                           "cache_dir": str(disk / "cache")})
        for workers in ("1", "2"):
            err = refused(stepc("data", "prepare", str(spec), "--workers", workers, cwd=tmp_path),
                          "[data.cache_dir]: the disk holding the shard cache is full", "set data.cache_dir to a disk with room")
            assert err.count("error:") == 1 and f"error: {disk}/{where}" in err, err
            assert [p.name for p in disk.rglob("*.tmp")] == []
