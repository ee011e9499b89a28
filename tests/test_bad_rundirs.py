"""Commands given odd run directories and files (issue 14): verify, diff, run, report, eval and the stage
scripts never hang, never follow a link out of the run directory, never print a traceback.

verify reports what is wrong inside a run directory as FAILED (exit 1, naming the file); every other
command refuses input it cannot use with exit 2, naming the file (and the manifest key), and writes
nothing. A real stage 1 (one gloo rank, ~20 s) provides an unfinished run and a real export to damage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, RunFactory, check_ok, run_stage

from stepc.cli import main
from stepc.compiler.manifest import dumps
from stepc.hashing import content_hash

# One rank, 6 + ~6 steps, one evaluation at the end of each stage: a real stage 1 in a few seconds of training.
ONE_RANK = {"launch": {"nproc_per_node": 1}, "eval": {"every_steps": 100, "max_tokens": 512},
            "train": {"micro_batch_size": 4, "reference_steps": 8, "warmup_steps": 1, "checkpoint_every": 4}}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, small_corpus) -> Path:
    """A compiled (untrained) run directory; tests copy it."""
    return RunFactory(tmp_path_factory.mktemp("compiled"), small_corpus).compile("odd", **ONE_RANK)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, small_corpus) -> Path:
    """A run whose stage 1 has finished (export checkpoints/stage-1/final) and stage 2 not begun."""
    run_dir = RunFactory(tmp_path_factory.mktemp("stage1"), small_corpus).compile("half", **ONE_RANK)
    check_ok(run_stage(run_dir, 1))
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run_dir.name
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def stepc(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: for cases that could hang (a FIFO) or need the exit of a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "stepc.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.out, captured.err


def rewrite_manifest(run_dir: Path, edit) -> None:
    """Apply `edit` to manifest.json and re-seal its content hash, so only the edited field is wrong."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if isinstance(manifest, dict):
        manifest["hash"] = content_hash(manifest)
    path.write_text(dumps(manifest) if isinstance(manifest, dict) else json.dumps(manifest))


# ------------------------------------------------------------------------------------------ verify


def test_verify_accepts_the_manifest_path(compiled, capsys):
    code, out, _ = run_cli(capsys, "verify", str(compiled / "manifest.json"))
    assert code == 0 and "verified" in out


def test_verify_does_not_follow_a_symlink_even_to_identical_content(compiled, tmp_path, capsys):
    run_dir = copy_run(compiled, tmp_path)
    outside = tmp_path / "elsewhere.md"
    shutil.move(run_dir / "plan.md", outside)  # same bytes, so a verify that followed the link would pass
    (run_dir / "plan.md").symlink_to(outside)
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "plan.md: is a symbolic link" in out and "FAILED" in out


def test_verify_refuses_files_entries_outside_the_run_dir(compiled, tmp_path, capsys):
    run_dir = copy_run(compiled, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    from stepc.hashing import digest as sha256_bytes

    rewrite_manifest(run_dir, lambda m: m["files"].update({"../secret.txt": sha256_bytes(b"x"),
                                                            "/etc/hostname": sha256_bytes(b"x")}))
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "points outside the run directory" in out and "../secret.txt" in out and "/etc/hostname" in out


def test_verify_reports_a_directory_where_a_file_was(compiled, tmp_path, capsys):
    run_dir = copy_run(compiled, tmp_path)
    (run_dir / "memory.png").unlink()
    (run_dir / "memory.png").mkdir()
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "memory.png: is a directory" in out


def test_verify_does_not_hang_on_a_fifo(compiled, tmp_path):
    run_dir = copy_run(compiled, tmp_path)
    (run_dir / "plan.md").unlink()
    os.mkfifo(run_dir / "plan.md")
    proc = stepc("verify", str(run_dir), timeout=60)
    assert proc.returncode == 1 and "plan.md: is not a regular file" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("edit, expected", [
    ('budget = "1MB"', "no longer compiles: [memory.budget]"),  # infeasible
    ("hidden_size = 64\nhidden_size = 64", "no longer compiles: [model.hidden_size]"),  # duplicate key
    ("hidden_size = 63", "no longer compiles: [model.num_attention_heads]"),
], ids=["infeasible", "duplicate-key", "invalid"])
def test_verify_with_an_edited_spec_reports_failed_naming_spec_toml(compiled, tmp_path, capsys, edit, expected):
    run_dir = copy_run(compiled, tmp_path)
    spec = run_dir / "spec.toml"
    text = spec.read_text()
    if "budget" in edit:
        text = text.replace("[memory]\n", f"[memory]\n{edit}\n")
    else:
        text = text.replace("hidden_size = 64", edit)
    spec.write_text(text)
    code, out, err = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "spec.toml: content differs" in out and expected in out, out
    assert err == ""


def test_verify_binary_spec_toml(compiled, tmp_path, capsys):
    run_dir = copy_run(compiled, tmp_path)
    (run_dir / "spec.toml").write_bytes(bytes(range(256)))
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "spec.toml: is not UTF-8" in out


def test_verify_of_no_run_dir_is_a_user_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "verify", str(tmp_path))
    assert code == 2 and "no manifest here" in err and str(tmp_path) in err


# -------------------------------------------------------------------------------- manifest shape

SHAPES = [  # (id, edit of the manifest dict, key the message names)
    ("plan-stages-empty", lambda m: m["plan"].update(stages=[]), "plan.stages"),
    ("plan-stages-string", lambda m: m["plan"].update(stages="two"), "plan.stages"),
    ("stage-not-object", lambda m: m["plan"]["stages"].__setitem__(0, 7), "plan.stages[0]"),
    ("stage-steps-missing", lambda m: m["plan"]["stages"][0].pop("steps"), "plan.stages[0].steps"),
    ("stage-steps-negative", lambda m: m["plan"]["stages"][1].update(steps=-3), "plan.stages[1].steps"),
    ("stage-index-wrong", lambda m: m["plan"]["stages"][1].update(index=5), "plan.stages[1].index"),
    ("stage-flops-string", lambda m: m["plan"]["stages"][0].update(flops="many"), "plan.stages[0].flops"),
    ("plan-layers-string", lambda m: m["plan"].update(layers="2,2"), "plan.layers"),
    ("plan-method-missing", lambda m: m["plan"].pop("method"), "plan.method"),
    ("files-list", lambda m: m.update(files=["spec.toml"]), "files"),
    ("files-hash-int", lambda m: m["files"].update({"plan.md": 5}), "files.plan.md"),
    ("spec-hidden-string", lambda m: m["spec"]["model"].update(hidden_size="64"), "spec.model.hidden_size"),
    ("spec-unknown-key", lambda m: m["spec"]["model"].update(hiden=1), "spec.model.hiden"),
    ("spec-missing", lambda m: m.pop("spec"), None),
]


@pytest.mark.parametrize("edit, key", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_malformed_manifest(compiled, tmp_path, capsys, edit, key):
    run_dir = copy_run(compiled, tmp_path)
    rewrite_manifest(run_dir, edit)
    code, out, _ = run_cli(capsys, "verify", str(run_dir))
    assert code == 1 and "manifest.json:" in out and "FAILED" in out
    if key:
        assert f"[{key}]" in out, out
    out_dir = tmp_path / "report"
    for args in (["run", str(run_dir)], ["report", str(run_dir), "--out", str(out_dir)], ["eval", str(run_dir)]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and str(run_dir / "manifest.json") in err and "fix:" in err, (args, err)
        if key:
            assert f"[{key}]" in err, err
    assert not out_dir.exists() and not (run_dir / "checkpoints").exists() and not (run_dir / "eval.json").exists()


# ------------------------------------------------------------------------------------------- diff


@pytest.mark.parametrize("text", ["[]", '"a string"', "42", "null", "{}", '{"spec": 1}', "not json", "\x00\x01"],
                         ids=["list", "string", "number", "null", "empty-object", "partial", "garbage", "binary"])
def test_diff_rejects_what_is_not_a_manifest(compiled, tmp_path, capsys, text):
    other = tmp_path / "other.json"
    other.write_text(text)
    for args in (["diff", str(other), str(compiled)], ["diff", str(compiled), str(other)]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and f"error: {other}" in err and "manifest" in err and out == ""


def test_diff_still_shows_an_edited_manifest(compiled, tmp_path, capsys):
    run_dir = copy_run(compiled, tmp_path)
    rewrite_manifest(run_dir, lambda m: m["plan"]["stages"][0].update(steps=-3))  # malformed, but a manifest
    code, out, _ = run_cli(capsys, "diff", str(compiled), str(run_dir))
    assert code == 1 and "plan.stages[0].steps" in out and "-3" in out


@pytest.mark.parametrize("command", ["diff", "verify", "report", "eval", "run"])
def test_fifo_manifest_never_hangs(tmp_path, compiled, command):
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    args = [command, str(fifo)] + ([str(compiled)] if command == "diff" else [])
    proc = stepc(*args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------- report


def _with_metrics(compiled: Path, tmp_path: Path, text: str | bytes) -> Path:
    run_dir = copy_run(compiled, tmp_path)
    path = run_dir / "metrics.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return run_dir


GOOD = '{"event": "train", "stage": 1, "step": 1, "loss": 6.1}\n'


@pytest.mark.parametrize("text, line", [
    (GOOD + "this is not json\n" + GOOD, 2),
    (b"\x89PNG\r\n\x1a\n\x00\x00garbage\n" + GOOD.encode(), 1),
    (GOOD + "[1, 2]\n", 2),
    (GOOD + '{"event": "train", "stage": 9, "step": 1, "loss": 1.0}\n', 2),
    (GOOD + '{"event": "train", "stage": 1, "step": "3", "loss": 1.0}\n', 2),
    (GOOD + '{"event": "train", "stage": 1, "step": 3, "loss": "low"}\n', 2),
    (GOOD + '{"event": "eval", "stage": 1, "step": 3, "ppl_heldout": null}\n', 2),
], ids=["text-line", "binary", "list-record", "unknown-stage", "string-step", "string-loss", "null-ppl"])
def test_report_on_garbage_metrics_names_the_line(compiled, tmp_path, capsys, text, line):
    run_dir = _with_metrics(compiled, tmp_path, text)
    out_dir = tmp_path / "report"
    code, _, err = run_cli(capsys, "report", str(run_dir), "--out", str(out_dir))
    assert code == 2 and f"metrics.jsonl:{line}" in err and "fix:" in err, err
    assert not out_dir.exists()


def test_report_skips_a_partial_last_line(compiled, tmp_path, capsys):
    run_dir = _with_metrics(compiled, tmp_path, GOOD + '{"event": "train", "stage": 1, "st')
    code, out, _ = run_cli(capsys, "report", str(run_dir), "--out", str(tmp_path / "report"))
    assert code == 0 and "unfinished" in out


def test_report_out_that_is_a_file(compiled, tmp_path, capsys):
    run_dir = _with_metrics(compiled, tmp_path, GOOD)
    target = tmp_path / "report.md"
    target.write_text("mine\n")
    code, _, err = run_cli(capsys, "report", str(run_dir), "--out", str(target))
    assert code == 2 and "[--out]" in err and "not a directory" in err
    assert target.read_text() == "mine\n"


def test_report_of_an_unfinished_run_shows_what_was_trained(stage1, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "report", str(stage1), "--out", str(tmp_path / "report"))
    assert code == 0
    from stepc.commands.report import read_run

    run = read_run(stage1)
    plan = json.loads((stage1 / "manifest.json").read_text())["plan"]
    first, second = plan["stages"]
    assert not run["finished"] and run["status"].startswith("unfinished: stage 1 of 2")
    assert run["steps"] == first["steps"] and run["tokens"] == first["tokens"] and run["flops"] == first["flops"]
    assert run["tokens"] < first["tokens"] + second["tokens"]
    assert f"{first['tokens']:,}" in out and f"{first['steps']} of {first['steps'] + second['steps']}" in out
    assert "Unfinished runs show" in (tmp_path / "report" / "report.md").read_text()


# ------------------------------------------------------------------------------------------- eval


def test_eval_limit_must_be_positive(compiled, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(compiled), "--limit", "-5"])
    assert exit_info.value.code == 2 and "--limit" in capsys.readouterr().err


def _with_export(stage1: Path, tmp_path: Path) -> Path:
    """stage 1's real export, placed where `stepc eval` looks (the task checks run before the model loads)."""
    run_dir = copy_run(stage1, tmp_path)
    shutil.copytree(run_dir / "checkpoints" / "stage-1" / "final", run_dir / "export")
    return run_dir


def test_eval_tasks_are_checked_before_the_model_loads(stage1, tmp_path, capsys, monkeypatch):
    """An unknown task and a task whose data is online only: exit 2 naming --tasks, before any model loads."""
    import lm_eval  # noqa: F401  (a test dependency: missing means failing, not skipping)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = _with_export(stage1, tmp_path)
    for tasks, expected in (("no_such_task_xyz", "unknown lm-eval task 'no_such_task_xyz'"),
                            ("lambada_openai", "cannot load its data offline")):
        code, _, err = run_cli(capsys, "eval", str(run_dir), "--tasks", tasks)
        assert code == 2 and "[--tasks]" in err and expected in err, err
        assert not (run_dir / "eval.json").exists()


def test_eval_include_path_must_be_a_directory(stage1, tmp_path, capsys):
    run_dir = _with_export(stage1, tmp_path)
    code, _, err = run_cli(capsys, "eval", str(run_dir), "--tasks", "x", "--include-path", str(tmp_path / "nope"))
    assert code == 2 and "[--include-path]" in err


def test_eval_refuses_a_damaged_export(stage1, tmp_path, capsys):
    run_dir = _with_export(stage1, tmp_path)
    weights = run_dir / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "eval", str(run_dir))
    assert code == 2 and "model.safetensors has different content" in err
    assert not (run_dir / "eval.json").exists()


# ------------------------------------------------------------------------------ export integrity


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":
        data[len(data) // 2] ^= 0x01  # one bit, same size: only the hash can tell
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how, expected", [("flipped", "different content (sha256)"), ("truncated",
                                                                                       "bytes, but the export recorded"),
                                           ("missing", "is missing"), ("legacy", "lists no files")])
def test_next_stage_refuses_a_damaged_export(stage1, tmp_path, how, expected):
    run_dir = copy_run(stage1, tmp_path)
    final = run_dir / "checkpoints" / "stage-1" / "final"
    if how == "legacy":
        (final / "EXPORT_COMPLETE").write_text("ok\n")  # what stepc wrote before sizes and hashes
    else:
        _damage(final / "model.safetensors", how)
    proc = run_stage(run_dir, 2, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "stage 1's export" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints" / "stage-2").exists(), "stage 2 started from a damaged export"


def test_export_marker_records_every_file(stage1):
    final = stage1 / "checkpoints" / "stage-1" / "final"
    record: dict[str, Any] = json.loads((final / "EXPORT_COMPLETE").read_text())
    names = sorted(p.name for p in final.iterdir() if p.name != "EXPORT_COMPLETE")
    assert sorted(record["files"]) == names and "model.safetensors" in names
    import hashlib

    entry = record["files"]["model.safetensors"]
    data = (final / "model.safetensors").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
