"""`--set KEY=VALUE` on compile and plan: validated like the file, recorded in spec.toml and the manifest."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from stepc.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "specs" / "tiny-cpu.toml"


def compile_to(out: Path, *sets: str) -> int:
    return main(["compile", str(TINY), "--out", str(out), *[a for s in sets for a in ("--set", s)]])


def test_overrides_reach_spec_toml_manifest_diff_and_verify(tmp_path, capsys):
    assert compile_to(tmp_path / "base") == 0
    sets = ("train.lr=1e-3", "launch.slurm.partition=gpu", "memory.layers=[4, 2]")
    assert compile_to(tmp_path / "a", *sets) == 0
    run = tmp_path / "a" / "tiny-cpu"
    resolved = tomllib.loads((run / "spec.toml").read_text())
    assert resolved["train"]["lr"] == 1e-3 and resolved["launch"]["slurm"]["partition"] == "gpu"
    assert resolved["memory"]["layers"] == [4, 2]
    text = (run / "spec.toml").read_text()
    # it starts with the record of every --set, in the order given, and then the user's file
    assert text.splitlines()[0] == ("# Resolved by stepc: --set train.lr=1e-3, --set launch.slurm.partition=gpu, "
                                    "--set memory.layers=[4, 2] (values below)")
    assert text.splitlines()[1] == TINY.read_text().splitlines()[0]
    assert "lr = 1e-3" in text  # the user's spelling of the value
    assert "# The embedded default" in text  # the file's own comments are kept
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["overrides"] == {"launch.slurm.partition": "gpu", "memory.layers": [4, 2], "train.lr": 1e-3}
    assert manifest["spec"]["train"]["lr"] == 1e-3 and manifest["plan"]["layers"] == [4, 2]
    assert "#SBATCH --partition=gpu" in (run / "run.sbatch").read_text()

    capsys.readouterr()
    assert main(["diff", str(tmp_path / "base" / "tiny-cpu"), str(run)]) == 1
    shown = capsys.readouterr().out
    assert "spec.train.lr: 0.003 -> 0.001" in shown and "overrides: (absent)" in shown
    assert main(["verify", str(run)]) == 0

    # byte-identical recompile with the same overrides
    assert compile_to(tmp_path / "b", *sets) == 0
    for name in ("manifest.json", "spec.toml", "run.sbatch", "stage-1.sh"):
        assert (run / name).read_bytes() == (tmp_path / "b" / "tiny-cpu" / name).read_bytes(), name
    # no overrides: the spec is copied as given and the manifest has no overrides key
    base = tmp_path / "base" / "tiny-cpu"
    assert (base / "spec.toml").read_bytes() == TINY.read_bytes()
    assert "overrides" not in json.loads((base / "manifest.json").read_text())


def test_a_bare_word_is_a_string_and_tables_are_created(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("\n".join(line for line in TINY.read_text().splitlines() if "partition" not in line) + "\n")
    # [launch.slurm] exists without partition; [data.validation] gains a new key
    assert main(["compile", str(spec), "--out", str(tmp_path / "o"), "--set", "launch.slurm.partition=batch",
                 "--set", "data.validation.extra=data/x.txt"]) == 0
    manifest = json.loads((tmp_path / "o" / "tiny-cpu" / "manifest.json").read_text())
    assert manifest["spec"]["launch"]["slurm"]["partition"] == "batch"
    assert manifest["spec"]["data"]["validation"]["extra"] == "data/x.txt"


def test_plan_takes_overrides(capsys):
    assert main(["plan", str(TINY), "--set", "memory.stages=3"]) == 0
    assert "layout [3, 2, 1]" in capsys.readouterr().out


@pytest.mark.parametrize("sets, key, words", [
    (["train.lr=abc"], "[train.lr]", ["valid number", "--set train.lr=abc"]),
    (["train.lrr=1e-3"], "[train.lrr]", ["did you mean 'train.lr'", "--set train.lrr=1e-3"]),
    (["train.lr.x=1"], "[train.lr.x]", ["is a value, not a table"]),
    (["train.global_batch_tokens=1536"], "[train.global_batch_tokens]", ["not a multiple",
                                                                         "--set train.global_batch_tokens=1536"]),
    (["launch.nnodes=2"], "[train.global_batch_tokens]", ["not a multiple", "--set launch.nnodes=2 applied"]),
    (["memory.budget=\"1MB\""], "[memory.budget]", ["over the budget", "--set memory.budget"]),
    (["train.lr"], None, ["not KEY=VALUE"]),
    (["train.lr=1", "train=2"], "[train]", ["set the same key"]),
])
def test_bad_overrides_are_user_errors(tmp_path, capsys, sets, key, words):
    out = tmp_path / "out"
    assert compile_to(out, *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    if key:
        assert key in err, err
    for word in words:
        assert word in err, err
    assert not (out / "tiny-cpu").exists()
