"""Malformed specs through the real CLI: exit code 2, one paragraph naming the file, the key and the fix.

Every case is run through `stepc.cli.main` in-process; a sample also through `python -m stepc.cli` in a
subprocess. No case may print a traceback or create the output directory.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from stepc.cli import main

REPO = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "experiment": {"name": "errors", "seed": 1, "method": "step"},
    "model": {"hidden_size": 128, "num_layers": 6, "num_attention_heads": 4, "vocab_size": 4096, "seq_len": 128},
    "memory": {"budget": "40MB", "stages": 2, "accounting": "paper"},
    "step": {"lora_rank": 16, "grow_at": 0.75},
    "train": {"reference_steps": 300, "global_batch_tokens": 1024, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 30,
              "betas": [0.9, 0.95]},
    "data": {"train": ["data/corpus/train/*.txt"], "tokenizer": "bpe-4096",
             "validation": {"milton": "data/corpus/validation/*.txt"}},
    "launch": {"nnodes": 1, "nproc_per_node": 2, "slurm": {"partition": "debug"}},
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer: scalars first, then sub-tables as [a.b] sections."""
    lines, tables = [], []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    text = ""
    if prefix or lines:
        text = (f"[{prefix}]\n" if prefix else "") + "\n".join(lines) + "\n\n"
    for key, value in tables:
        text += to_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def edit(**changes: Any) -> Callable[[dict], None]:
    """A mutation setting dotted keys ("model.hidden_size") to values; DELETE removes the key."""
    def apply(doc: dict) -> None:
        for dotted, value in changes.items():
            *path, last = dotted.split("__")
            node = doc
            for part in path:
                node = node.setdefault(part, {})
            if value is DELETE:
                node.pop(last)
            else:
                node[last] = value
    return apply


DELETE = object()


def rename(table: str, new: str) -> Callable[[dict], None]:
    def apply(doc: dict) -> None:
        doc[new] = doc.pop(table)
    return apply


# (id, mutation or raw TOML text, key path that must be named, other text that must appear)
CASES: list[tuple[str, Any, str | None, str]] = [
    ("unknown-key-did-you-mean", edit(model__hiden_size=128), "model.hiden_size", "did you mean 'model.hidden_size'"),
    ("unknown-key-in-slurm", edit(launch__slurm__partiton="gpu"), "launch.slurm.partiton",
     "did you mean 'launch.slurm.partition'"),
    ("typo-table", rename("model", "modle"), "modle", "did you mean 'model'"),
    ("unknown-top-level-table", edit(optimizer__name="adam"), "optimizer", "unknown key"),
    ("missing-model", edit(model=DELETE), "model", "required"),
    ("missing-required-key", edit(model__hidden_size=DELETE), "model.hidden_size", "required"),
    ("string-for-int", edit(model__num_layers="6"), "model.num_layers", "integer"),
    ("bool-for-int", edit(model__hidden_size=True), "model.hidden_size", "integer"),
    ("float-for-int", edit(train__micro_batch_size=4.0), "train.micro_batch_size", "integer"),
    ("string-for-float", edit(train__lr="3e-3"), "train.lr", "valid number"),
    ("table-for-scalar", edit(experiment__seed={"value": 1}), "experiment.seed", "integer"),
    ("list-for-string", edit(data__tokenizer=["gpt2"]), "data.tokenizer", "string"),
    ("zero-layers", edit(model__num_layers=0), "model.num_layers", "greater than 0"),
    ("negative-hidden", edit(model__hidden_size=-128), "model.hidden_size", "greater than 0"),
    ("negative-seed", edit(experiment__seed=-1), "experiment.seed", "greater than or equal to 0"),
    ("nan-lr", edit(train__lr=float("nan")), "train.lr", "finite"),
    ("inf-weight-decay", edit(train__weight_decay=float("inf")), "train.weight_decay", "finite"),
    ("nan-grow-at", edit(step__grow_at=float("nan")), "step.grow_at", "nan"),
    ("inf-lora-alpha", edit(step__lora_alpha=float("inf")), "step.lora_alpha", "finite"),
    ("heads-not-dividing-hidden", edit(model__num_attention_heads=5), "model.num_attention_heads",
     "do not divide hidden_size 128"),
    ("odd-head-dim", edit(model__hidden_size=96, model__num_attention_heads=32), "model.num_attention_heads", "odd"),
    ("kv-heads-not-dividing", edit(model__num_key_value_heads=3), "model.num_key_value_heads", "do not divide 4 attention heads"),
    ("stages-more-than-layers", edit(memory__stages=7), "memory.stages", "at most 6 stages"),
    ("stages-zero", edit(memory__stages=0), "memory.stages", "greater than 0 or Input should be 'auto'"),
    ("stages-unknown-word", edit(memory__stages="many"), "memory.stages", "auto"),
    ("auto-without-budget", edit(memory__stages="auto", memory__budget=DELETE), "memory.budget", "needs a budget"),
    ("pinned-not-summing", edit(memory__layers=[3, 2]), "memory.layers", "sum to 5"),
    ("pinned-zero", edit(memory__layers=[6, 0]), "memory.layers[1]", "greater than 0"),
    ("pinned-wrong-count", edit(memory__layers=[2, 2, 2]), "memory.stages", "layers pins 3 stages"),
    ("grow-at-zero", edit(step__grow_at=0.0), "step.grow_at", "greater than 0"),
    ("grow-at-above-one", edit(step__grow_at=1.5), "step.grow_at", "less than or equal to 1"),
    ("lr-zero", edit(train__lr=0.0), "train.lr", "greater than 0"),
    ("beta-out-of-range", edit(train__betas=[0.9, 1.0]), "train.betas", "[0, 1)"),
    ("beta-negative", edit(train__betas=[-0.1, 0.95]), "train.betas", "[0, 1)"),
    ("betas-wrong-length", edit(train__betas=[0.9, 0.95, 0.99]), "train.betas", "at most 2"),
    ("budget-bad-unit", edit(memory__budget="3.5 parsecs"), "memory.budget", "KiB"),
    ("budget-negative", edit(memory__budget="-1GB"), "memory.budget", "cannot read"),
    ("budget-negative-int", edit(memory__budget=-5), "memory.budget", "positive"),
    ("budget-zero", edit(memory__budget="0GB"), "memory.budget", "at least 1 byte"),
    ("budget-bool", edit(memory__budget=True), "memory.budget", "valid integer or Input should be a valid string"),
    ("bad-name", edit(experiment__name="Bad Name"), "experiment.name", "pattern"),
    ("name-path-traversal", edit(experiment__name="../escape"), "experiment.name", "pattern"),
    ("unknown-method", edit(experiment__method="lora"), "experiment.method", "'step'"),
    ("unknown-solver", edit(memory__solver="cplex"), "memory.solver", "'glpk'"),
    ("vanilla-with-two-stages", edit(experiment__method="vanilla"), "memory.stages", "trains in one stage"),
    ("galore-on-8-ranks", edit(experiment__method="galore", memory__stages=1, launch__nproc_per_node=8,
                               train__micro_batch_size=1), "launch.nproc_per_node", "single rank"),
    ("batch-not-divisible", edit(train__global_batch_tokens=1000), "train.global_batch_tokens", "not a multiple of"),
    ("rank-above-hidden", edit(step__lora_rank=256), "step.lora_rank", "exceeds hidden_size"),
    ("gpt2-vocab-too-small", edit(data__tokenizer="gpt2"), "model.vocab_size", "50257"),
    ("bad-slurm-time", edit(launch__slurm__time="one day"), "launch.slurm.time", "not a SLURM time limit"),
    ("slurm-partition-newline", edit(launch__slurm__partition="gpu\ntouch pwned #"), "launch.slurm.partition", "one line"),
    ("slurm-extra-newline", edit(launch__slurm__extra=["--exclusive\necho injected"]), "launch.slurm.extra[0]", "one line"),
    ("infeasible-budget", edit(memory__budget="1MB"), "memory.budget", "Smallest achievable peak per stage count"),
    ("syntax-error", "[experiment]\nname = \"errors\"\n[model]\nhidden_size = = 128\n", None, "line 4, column"),
    ("unterminated-string", "[experiment]\nname = \"errors\n", None, "line 2"),
]


def write_case(tmp_path: Path, case: Any) -> Path:
    doc = copy.deepcopy(BASE)
    if callable(case):
        case(doc)
        text = to_toml(doc)
    else:
        text = case
    spec = tmp_path / "bad spec.toml"  # a space in the name: it must still be named verbatim
    spec.write_text(text)
    return spec


def assert_user_error(spec: Path, out: Path, code: int, stderr: str, key: str | None, expected: str) -> None:
    assert code == 2, stderr
    assert str(spec) in stderr
    if key is not None:
        assert f"[{key}]" in stderr
    assert expected in stderr
    assert "fix:" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_base_spec_compiles(tmp_path, capsys):
    spec = write_case(tmp_path, lambda doc: None)
    assert main(["compile", str(spec), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "errors" / "manifest.json").exists()


def test_there_are_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case, key, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_spec_in_process(tmp_path, capsys, case, key, expected):
    spec = write_case(tmp_path, case)
    out = tmp_path / "out"
    code = main(["compile", str(spec), "--out", str(out)])
    captured = capsys.readouterr()
    assert_user_error(spec, out, code, captured.err, key, expected)
    assert captured.out == ""


SUBPROCESS_CASES = ["unknown-key-did-you-mean", "nan-lr", "budget-bad-unit", "syntax-error", "infeasible-budget",
                    "galore-on-8-ranks"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_malformed_spec_in_subprocess(tmp_path, name):
    _, case, key, expected = next(c for c in CASES if c[0] == name)
    spec = write_case(tmp_path, case)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "stepc.cli", "compile", str(spec), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_user_error(spec, out, result.returncode, result.stderr, key, expected)


def test_missing_spec_file(tmp_path, capsys):
    spec = tmp_path / "nowhere.toml"
    out = tmp_path / "out"
    code = main(["compile", str(spec), "--out", str(out)])
    assert_user_error(spec, out, code, capsys.readouterr().err, None, "not found")


def test_syntax_error_reports_line_and_column(tmp_path, capsys):
    spec = write_case(tmp_path, "[experiment]\nname = \"errors\"\n\n[model]\nhidden_size = 128\nnum_layers = 6 6\n")
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "TOML syntax error" in err and "line 6, column 16" in err


def test_several_problems_are_all_listed(tmp_path, capsys):
    spec = write_case(tmp_path, edit(model__hidden_size="128", train__lr=-1.0, memory__sovler="glpk"))
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    for key in ("model.hidden_size", "train.lr", "memory.sovler"):
        assert key in err
    assert "did you mean 'memory.solver'" in err


# ----------------------------------------------------------------------------- positive cases


def manifest_spec(tmp_path: Path, mutate: Callable[[dict], None]) -> dict:
    tmp_path.mkdir(exist_ok=True)
    spec = write_case(tmp_path, mutate)
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--out", str(out)]) == 0
    return json.loads((out / "errors" / "manifest.json").read_text())["spec"]


@pytest.mark.parametrize("budget, expected", [
    ("40MB", 40 * 10**6),
    ("40 MiB", 40 * 2**20),
    ("0.04GB", 4 * 10**7),
    ("0.5GiB", 2**29),
    ("1.5e7B", 15 * 10**6),
    ("41943040", 41943040),  # a bare number string is bytes
    (41_943_040, 41_943_040),
    ("40mB".upper(), 40 * 10**6),  # prefixes are case-insensitive (a lower-case b, bits, is refused: test_bad_input.py)
    ("40000kB", 40 * 10**6),
])
def test_budget_units(tmp_path, capsys, budget, expected):
    spec = manifest_spec(tmp_path, edit(memory__budget=budget))
    assert spec["memory"]["budget"] == expected


def test_gb_and_gib_differ(tmp_path, capsys):
    """GB is 10^9 (the paper's "G"), GiB is 2^30: 18.1MiB fits a model that 18.1MB does not."""
    need = 16 * 6 * (12 * 128**2 + 2 * 128)  # Eq. 1 with Eq. 4 for the base model (d = 128, L = 6)
    assert 18.1e6 < need < 18.1 * 2**20
    ok = manifest_spec(tmp_path / "a", edit(memory__stages=1, memory__budget="18.1MiB"))
    assert ok["memory"]["budget"] == int(18.1 * 2**20)
    spec = write_case(tmp_path, edit(memory__stages=1, memory__budget="18.1MB"))
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "[memory.budget]" in err and "K=1: 0.019 GB" in err


def test_defaults_are_resolved_in_the_manifest(tmp_path, capsys):
    spec = manifest_spec(tmp_path, edit(memory__stages=DELETE, model__num_attention_heads=8))
    assert spec["model"]["num_key_value_heads"] == 8
    assert spec["model"]["intermediate_size"] == round(8 / 3 * 128) == 341
    assert spec["memory"]["stages"] == 2  # the default for method "step"
    assert spec["memory"]["solver"] == "glpk" and spec["train"]["schedule"] == "cosine"


def test_stage_default_follows_method_and_pins(tmp_path, capsys):
    assert manifest_spec(tmp_path / "v", edit(experiment__method="vanilla", memory__stages=DELETE))["memory"]["stages"] == 1
    pinned = manifest_spec(tmp_path / "p", edit(memory__stages=DELETE, memory__layers=[3, 2, 1]))
    assert pinned["memory"]["stages"] == 3 and pinned["memory"]["layers"] == [3, 2, 1]
