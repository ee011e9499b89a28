"""Bad data is a user error caught before torchrun: exit 2, one message naming the file (and where in
it) with a fix, no traceback, and nothing half-written left looking complete."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_stage, spec_tables, write_spec

from stepc.cli import main
from stepc.runtime.data import prepare as prepare_module

GOOD = "The quick brown fox jumps over the lazy dog.\n" * 40


def prepare_cli(tmp_path: Path, capsys, train: list[str]) -> tuple[int, str]:
    tables = spec_tables(tmp_path)
    tables["data"] = {"train": train, "tokenizer": "gpt2", "cache_dir": str(tmp_path / "cache")}
    tables["model"]["vocab_size"] = 50257
    del tables["data.validation"]
    spec = write_spec(tmp_path / "spec.toml", tables)
    capsys.readouterr()
    code = main(["data", "prepare", str(spec), "--workers", "1"])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, file: Path | str, *needles: str) -> None:
    assert code == 2, err
    assert str(file) in err and "fix:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def assert_nothing_complete(tmp_path: Path) -> None:
    assert not list((tmp_path / "cache").rglob("index.json")) if (tmp_path / "cache").exists() else True


def test_glob_matching_nothing(tmp_path, capsys):
    pattern = str(tmp_path / "nowhere" / "*.parquet")
    code, err = prepare_cli(tmp_path, capsys, [pattern])
    assert_refused(code, err, pattern, "matches no file", "[data.train]")


def test_unsupported_extension(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(GOOD)
    (tmp_path / "d" / "b.csv").write_text("text\nhello\n")
    code, err = prepare_cli(tmp_path, capsys, [str(tmp_path / "d" / "*")])
    assert_refused(code, err, tmp_path / "d" / "b.csv", "unsupported data file type '.csv'")


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    code, err = prepare_cli(tmp_path, capsys, [str(tmp_path / "empty.txt")])
    assert_refused(code, err, tmp_path / "empty.txt", "empty")


def test_unreadable_parquet(tmp_path, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    code, err = prepare_cli(tmp_path, capsys, [str(tmp_path / "broken.parquet")])
    assert_refused(code, err, tmp_path / "broken.parquet", "not a readable parquet file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission(tmp_path, capsys):
    path = tmp_path / "secret.txt"
    path.write_text(GOOD)
    path.chmod(0)
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "cannot read")


def test_jsonl_line_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    first = json.dumps({"text": GOOD}) + "\n"
    path.write_text(first + "{not json\n")
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, f"byte offset {len(first.encode())}", "not JSON")
    assert_nothing_complete(tmp_path)


def test_jsonl_line_without_the_field(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": GOOD}) + "\n" + json.dumps({"body": "x"}) + "\n")
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "no field 'text'", "[data.text_field]")
    assert_nothing_complete(tmp_path)


def test_field_that_is_not_text(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": 5}) + "\n")
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "holds int, not text")
    table = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), table)
    code, err = prepare_cli(tmp_path, capsys, [str(table)])
    assert_refused(code, err, table, "holds int64, not text")


def test_parquet_without_the_column(tmp_path, capsys):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": [GOOD]}), path)
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "no column 'text'", "columns: body")


def test_text_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(GOOD.encode() + "caf\u00e9".encode("latin-1") + b"\n")
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, f"not UTF-8 text at byte offset {len(GOOD) + 3}")
    assert_nothing_complete(tmp_path)


def test_file_that_changes_during_preparation(tmp_path, capsys, monkeypatch):
    path = tmp_path / "growing.jsonl"
    path.write_text(json.dumps({"text": GOOD}) + "\n")
    real_plan = prepare_module.plan_units

    def plan_then_append(file, text_field):  # the file grows after it was hashed, while it is tokenised
        units = real_plan(file, text_field)
        with open(file, "a") as fh:
            fh.write(json.dumps({"text": "appended"}) + "\n")
        return units

    monkeypatch.setattr(prepare_module, "plan_units", plan_then_append)
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "changed while it was being prepared")
    assert not list((tmp_path / "cache" / "shards").rglob("*.bin"))  # no shard of the new bytes under the old key
    assert_nothing_complete(tmp_path)


def test_file_that_changes_between_its_units_loses_its_finished_shards(tmp_path, capsys, monkeypatch):
    """The file changes after its first unit was tokenised: the refusal (a DataFileChanged, told apart
    by type, not by its message) also removes that unit's shard, so no shard of a file that was being
    rewritten survives under the key of its old content."""
    from stepc.runtime.data import documents

    path = tmp_path / "rewritten.jsonl"
    path.write_text("".join(json.dumps({"text": f"{GOOD} {i}"}) + "\n" for i in range(6)))
    monkeypatch.setattr(documents, "TARGET_UNIT_BYTES", path.stat().st_size // 3)  # three units or so
    real_read = prepare_module.read_unit

    def read_then_append(file, unit, *args):
        if unit.start > 0:  # the first unit is finished: the file grows under the second
            with open(file, "a") as fh:
                fh.write(json.dumps({"text": "appended"}) + "\n")
        return real_read(file, unit, *args)

    monkeypatch.setattr(prepare_module, "read_unit", read_then_append)
    code, err = prepare_cli(tmp_path, capsys, [str(path)])
    assert_refused(code, err, path, "changed while it was being prepared")
    assert not list((tmp_path / "cache" / "shards").rglob("*.bin"))
    assert_nothing_complete(tmp_path)


def test_stage_script_refuses_bad_data_before_torchrun(make_run, small_corpus, tmp_path):
    """The stage script's preparation step exits 2 with the message; torchrun never starts."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": GOOD}) + "\n" + "{oops\n")
    run_dir = make_run.compile("rt", data__validation={"bad": str(bad)})
    proc = run_stage(run_dir, 1, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "not JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert "torch.distributed" not in proc.stdout + proc.stderr
    assert not (run_dir / "data-index.json").exists()
    assert not (run_dir / "checkpoints" / "stage-1").exists()


def test_stepc_run_stops_at_bad_data(make_run, tmp_path):
    import sys

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    run_dir = make_run.compile("rt", data__validation={"bad": str(bad)})
    proc = subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_dir)], capture_output=True, text=True,
                          cwd=run_dir, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "byte offset 0" in proc.stderr and "Traceback" not in proc.stderr
    assert "== stage 1" not in proc.stdout
