"""Bad input, second pass (issue 14): spec mistakes that are knowable at compile time are refused there.

Each case runs `stepc compile` in-process on a spec that differs from a valid one in one place and
asserts the contract: exit 2, the spec file and the TOML key named, a fix, no traceback, nothing
written. Grouped by class: runtime-facing values the runtime used to trip over, sizes no real model
has, budgets that bind baselines too, and messages that used to blame the wrong key.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepc.cli import main

REPO = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "experiment": {"name": "bad-input", "seed": 1, "method": "step"},
    "model": {"hidden_size": 128, "num_layers": 6, "num_attention_heads": 4, "vocab_size": 4096, "seq_len": 128},
    "memory": {"budget": "40MB", "stages": 2, "accounting": "paper"},
    "step": {"lora_rank": 16, "relora_reset_every": 50, "restart_warmup_steps": 5},
    "train": {"reference_steps": 300, "global_batch_tokens": 1024, "micro_batch_size": 4, "warmup_steps": 30},
    "data": {"train": ["data/corpus/train/*.txt"], "tokenizer": "bpe-4096",
             "validation": {"milton": "data/corpus/validation/*.txt"}},
    "launch": {"nnodes": 1, "nproc_per_node": 2, "slurm": {"partition": "debug", "time": "00:30:00"}},
}
DELETE = object()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    lines = [f"[{prefix}]"] if prefix else []
    lines += [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict) or k == "validation"]
    text = "\n".join(lines) + "\n"
    for key, value in doc.items():
        if isinstance(value, dict) and key != "validation":
            text += "\n" + to_toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def spec_text(**changes: Any) -> str:
    """BASE with dotted keys ("model__seq_len") set, or removed with DELETE."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = doc
        for part in path:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return to_toml(doc)


def compile_text(tmp_path: Path, text: str, capsys, *extra: str) -> tuple[int, str, Path, Path]:
    spec = tmp_path / "my spec.toml"
    spec.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    code = main(["compile", str(spec), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.err, spec, out


def assert_refused(code: int, err: str, spec: Path, out: Path, key: str | None, expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") and str(spec) in err, err
    if key is not None:
        assert f"[{key}]" in err, err
    assert expected in err, err
    assert "fix:" in err and "Traceback" not in err, err
    assert not out.exists(), "a refused compile wrote something"


# (id, changes to BASE, key that must be named, text that must appear)
RUNTIME_FACING = [
    ("train-empty-list", {"data__train": []}, "data.train", "at least 1 item"),
    ("train-empty-string", {"data__train": [""]}, "data.train[0]", "at least 1 character"),
    ("train-blank-string", {"data__train": ["data/a.txt", "   "]}, "data.train[1]", "empty or blank"),
    ("train-padded-path", {"data__train": [" data/a.txt"]}, "data.train[0]", "whitespace"),
    ("train-csv-glob", {"data__train": ["data/*.csv"]}, "data.train[0]", "'.csv'"),
    ("train-json-file", {"data__train": ["data/train.json"]}, "data.train[0]", "'.json'"),
    ("train-directory", {"data__train": ["data/corpus/train"]}, "data.train[0]", "no file type"),
    ("train-trailing-slash", {"data__train": ["data/corpus/train/"]}, "data.train[0]", "directory"),
    ("validation-csv", {"data__validation": {"val": "data/val.csv"}}, "data.validation.val", "'.csv'"),
    ("validation-empty-path", {"data__validation": {"val": ""}}, "data.validation.val", "at least 1 character"),
    ("validation-blank-path", {"data__validation": {"val": " "}}, "data.validation.val", "empty or blank"),
    ("validation-reserved-name", {"data__validation": {"heldout": "v.txt"}}, "data.validation.heldout", "reserved"),
    ("validation-name-space", {"data__validation": {"my set": "v.txt"}}, "data.validation.my set", "ASCII letters"),
    ("validation-name-unicode", {"data__validation": {"caf\u00e9": "v.txt"}}, "data.validation.caf\u00e9", "ASCII"),
    ("bpe-256", {"data__tokenizer": "bpe-256"}, "data.tokenizer", "at least 512"),
    ("bpe-511", {"data__tokenizer": "bpe-511"}, "data.tokenizer", "at least 512"),
    ("bpe-above-vocab", {"data__tokenizer": "bpe-8192"}, "data.tokenizer", "at most model.vocab_size = 4096"),
    ("bpe-huge", {"data__tokenizer": "bpe-" + "9" * 40}, "data.tokenizer", "at most model.vocab_size"),
    ("bpe-arabic-indic-digits", {"data__tokenizer": "bpe-\u0664\u0660\u0669\u0666"}, "data.tokenizer", "ASCII digits"),
    ("bpe-superscript-digit", {"data__tokenizer": "bpe-\u00b2"}, "data.tokenizer", "ASCII digits"),
    ("bpe-fullwidth-digits", {"data__tokenizer": "bpe-\uff14\uff10\uff19\uff16"}, "data.tokenizer", "ASCII digits"),
    ("bpe-no-number", {"data__tokenizer": "bpe-"}, "data.tokenizer", "bpe-<N>"),
    ("bpe-upper-case", {"data__tokenizer": "BPE-4096"}, "data.tokenizer", "bpe-<N>"),
    ("bpe-negative", {"data__tokenizer": "bpe--4096"}, "data.tokenizer", "bpe-<N>"),
    ("gpt2-misspelt", {"data__tokenizer": "GPT-2"}, "data.tokenizer", "did you mean \"gpt2\""),
    ("tokenizer-blank", {"data__tokenizer": " gpt2"}, "data.tokenizer", "whitespace"),
    ("seq-len-1", {"model__seq_len": 1}, "model.seq_len", "greater than or equal to 16"),
    ("seq-len-8", {"model__seq_len": 8, "train__global_batch_tokens": 64}, "model.seq_len", "greater than or equal to 16"),
    ("warmup-longer-than-stage", {"train__warmup_steps": 400}, "train.warmup_steps", "longer than stage 1 (225 steps)"),
    ("warmup-default-too-long", {"train__warmup_steps": DELETE}, "train.warmup_steps", "1000 (the default)"),
    ("restart-warmup-not-shorter-than-reset", {"step__restart_warmup_steps": 50}, "step.restart_warmup_steps",
     "not shorter than the merge interval"),
    ("relora-warmup-longer-than-run", {"experiment__method": "relora", "memory__stages": 1, "memory__budget": DELETE,
                                       "step__relora_warm_start_steps": 20, "train__warmup_steps": 5000},
     "train.warmup_steps", "longer than the whole run"),
    ("slurm-partition-empty", {"launch__slurm__partition": ""}, "launch.slurm.partition", "must name a partition"),
    ("slurm-partition-blank", {"launch__slurm__partition": "  "}, "launch.slurm.partition", "sinfo"),
    ("slurm-time-words", {"launch__slurm__time": "2 days"}, "launch.slurm.time", "not a SLURM time limit"),
    ("slurm-time-minutes-61", {"launch__slurm__time": "10:61:00"}, "launch.slurm.time", "out of range"),
    ("slurm-time-hours-24-after-days", {"launch__slurm__time": "1-24:00"}, "launch.slurm.time", "out of range"),
    ("slurm-time-four-fields", {"launch__slurm__time": "1:00:00:00"}, "launch.slurm.time", "days-hours"),
    ("slurm-time-negative", {"launch__slurm__time": "-5"}, "launch.slurm.time", "not a SLURM time limit"),
    ("slurm-time-unicode-digits", {"launch__slurm__time": "\u0662\u0664:00:00"}, "launch.slurm.time", "not a SLURM"),
]

BOUNDS = [
    ("hidden-2**62", {"model__hidden_size": 2**62}, "model.hidden_size", "less than or equal to 65536"),
    ("vocab-1e15", {"model__vocab_size": 10**15}, "model.vocab_size", "less than or equal to 2097152"),
    ("heads-4096", {"model__num_attention_heads": 4096}, "model.num_attention_heads", "less than or equal to 1024"),
    ("kv-heads-4096", {"model__num_key_value_heads": 4096}, "model.num_key_value_heads", "less than or equal to 1024"),
    ("intermediate-1e7", {"model__intermediate_size": 10**7}, "model.intermediate_size", "less than or equal to"),
    ("intermediate-20x-hidden", {"model__intermediate_size": 20 * 128}, "model.intermediate_size", "16 x hidden_size"),
    ("seq-len-2**30", {"model__seq_len": 2**30}, "model.seq_len", "less than or equal to 1048576"),
    ("params-1e14", {"model__hidden_size": 65536, "model__num_layers": 1024, "model__num_attention_heads": 512,
                     "model__intermediate_size": 16 * 65536,
                     "memory__budget": DELETE}, "model.hidden_size", "parameter model"),
    ("galore-rank-above-hidden", {"experiment__method": "galore", "memory__stages": 1, "memory__budget": DELETE,
                                  "launch__nproc_per_node": 1, "step__galore_rank": 4096},
     "step.galore_rank", "exceeds hidden_size"),
    ("lora-rank-1e6", {"step__lora_rank": 10**6}, "step.lora_rank", "less than or equal to 65536"),
    ("micro-batch-1e6", {"train__micro_batch_size": 10**6}, "train.micro_batch_size", "less than or equal to 65536"),
    ("global-batch-2**40", {"train__global_batch_tokens": 2**40}, "train.global_batch_tokens", "less than or equal to"),
    ("reference-steps-1e12", {"train__reference_steps": 10**12}, "train.reference_steps", "less than or equal to 100000000"),
    ("warmup-1e12", {"train__warmup_steps": 10**12}, "train.warmup_steps", "less than or equal to 100000000"),
    ("reset-every-1e12", {"step__relora_reset_every": 10**12}, "step.relora_reset_every", "less than or equal to"),
    ("checkpoint-every-1e12", {"train__checkpoint_every": 10**12}, "train.checkpoint_every", "less than or equal to"),
    ("keep-checkpoints-1e6", {"train__keep_checkpoints": 10**6}, "train.keep_checkpoints", "less than or equal to 1000"),
    ("eval-max-tokens-1e15", {"eval__max_tokens": 10**15}, "eval.max_tokens", "less than or equal to"),
    ("eval-every-1e12", {"eval__every_steps": 10**12}, "eval.every_steps", "less than or equal to"),
    ("nproc-1e5", {"launch__nproc_per_node": 10**5}, "launch.nproc_per_node", "less than or equal to 1024"),
    ("nnodes-1e6", {"launch__nnodes": 10**6}, "launch.nnodes", "less than or equal to 65536"),
    ("gpus-per-node-1000", {"launch__slurm__gpus_per_node": 1000}, "launch.slurm.gpus_per_node", "less than or equal to 64"),
    ("lora-alpha-1e30", {"step__lora_alpha": 1e30}, "step.lora_alpha", "less than or equal to"),
]

BUDGETS = [  # the budget binds every method: a baseline over it is an error, not "EXCEEDED" and exit 0
    ("vanilla-over-budget", {"experiment__method": "vanilla", "memory__stages": 1, "memory__budget": "1MB"},
     "memory.budget", "the budget binds every method"),
    ("relora-over-budget", {"experiment__method": "relora", "memory__stages": 1, "memory__budget": "1MB",
                            "step__relora_warm_start_steps": 20, "train__warmup_steps": 10}, "memory.budget", "fixed layout"),
    ("galore-over-budget", {"experiment__method": "galore", "memory__stages": 1, "memory__budget": "1MB",
                            "launch__nproc_per_node": 1}, "memory.budget", "fixed layout"),
    ("budget-megabits", {"memory__budget": "40Mb"}, "memory.budget", "bits"),
    ("budget-lower-case-mb", {"memory__budget": "40mb"}, "memory.budget", "write MB for bytes"),
    ("budget-gibibits", {"memory__budget": "1Gib"}, "memory.budget", "write GiB"),
    ("budget-millibytes", {"memory__budget": "40mB"}, "memory.budget", "milli"),
]

WRONG_KEY = [
    ("pinned-layers-one-stage-method", {"experiment__method": "vanilla", "memory__stages": DELETE, "memory__budget": DELETE,
                                        "memory__layers": [3, 3]}, "memory.layers", "has one stage"),
]

CASES = RUNTIME_FACING + BOUNDS + BUDGETS + WRONG_KEY


def test_base_compiles(tmp_path, capsys):
    code, err, _, out = compile_text(tmp_path, spec_text(), capsys)
    assert code == 0, err
    assert "warning" not in err
    assert (out / "bad-input" / "manifest.json").is_file()


@pytest.mark.parametrize("changes, key, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_at_compile_time(tmp_path, capsys, changes, key, expected):
    code, err, spec, out = compile_text(tmp_path, spec_text(**changes), capsys)
    assert_refused(code, err, spec, out, key, expected)


@pytest.mark.parametrize("changes", [
    {"data__validation": {"1st": "data/corpus/validation/*.txt"}},  # refused before, with a fix it already followed
    {"data__validation": {"set-2": "data/v.jsonl", "b_3": "data/v.parquet"}},
    {"data__train": ["data/**"], "data__validation": {}},  # no literal file type: left to the runtime
    {"data__tokenizer": "./bpe-tokenizer-dir"},  # a path, not a bpe-N name
    {"data__tokenizer": "bpe-4096", "model__vocab_size": 4096},  # N = vocab_size is the upper end
    {"data__tokenizer": "bpe-512"},  # the lower end
    {"launch__slurm__time": "90"}, {"launch__slurm__time": "48:00:00"}, {"launch__slurm__time": "2-00"},
    {"launch__slurm__time": "2-12:30:15"}, {"launch__slurm__time": "UNLIMITED"}, {"launch__slurm__time": "30:00"},
    {"memory__budget": "40000kB"}, {"memory__budget": "1GiB"},
    {"experiment__method": "vanilla", "memory__stages": 1, "memory__budget": "1GB"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_accepted(tmp_path, capsys, changes):
    code, err, _, _ = compile_text(tmp_path, spec_text(**changes), capsys)
    assert code == 0, err


def test_bpe_rule_is_one_rule_for_compiler_and_runtime(tmp_path, capsys):
    """Every bpe-N name gets the same verdict from `stepc compile` and from the runtime's tokenizer loader
    (which really trains the tokenizer on a small file when it accepts the name)."""
    from stepc.hashing import file_sha256_hex
    from stepc.runtime.data.tokenizer import load_tokenizer

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(" ".join(f"word{i % 97} other{i % 13}" for i in range(3000)))
    verdicts = {}
    for n in ["256", "257", "511", "512", "513", "0512", "\u0665\u0661\u0662", "\u00b2", "", "-512", "4096"]:
        name = f"bpe-{n}"
        run = tmp_path / f"case-{len(verdicts)}"
        run.mkdir()
        code, err, _, _ = compile_text(run, spec_text(data__tokenizer=name), capsys)
        assert code in (0, 2) and "Traceback" not in err, err
        try:
            load_tokenizer(name, [file_sha256_hex(corpus)], lambda: iter([corpus.read_text()]), tmp_path / "cache")
            runtime_ok = True
        except ValueError:
            runtime_ok = False
        verdicts[name] = (code == 0, runtime_ok)
    assert all(c == r for c, r in verdicts.values()), verdicts
    assert verdicts["bpe-512"] == (True, True) and verdicts["bpe-511"] == (False, False)


def test_duplicate_key_names_the_key_and_shows_the_line(tmp_path, capsys):
    text = spec_text().replace("num_layers = 6\n", "num_layers = 6\nnum_layers = 8\n")
    code, err, spec, out = compile_text(tmp_path, text, capsys)
    assert_refused(code, err, spec, out, "model.num_layers", "defined twice")
    line = text.splitlines().index("num_layers = 8") + 1
    assert f"{line} | num_layers = 8" in err


def test_duplicate_table_names_the_table(tmp_path, capsys):
    text = spec_text() + "\n[model]\nhidden_size = 64\n"
    code, err, spec, out = compile_text(tmp_path, text, capsys)
    assert_refused(code, err, spec, out, "model", "defined twice")
    assert "| [model]" in err


def test_utf8_bom_is_accepted_and_recompiles_identically(tmp_path, capsys):
    code, err, _, out = compile_text(tmp_path, "\ufeff" + spec_text(), capsys)
    assert code == 0, err
    assert main(["verify", str(out / "bad-input")]) == 0


@pytest.mark.parametrize("budget", ["40Mb", "40mb", "1gb"])
def test_bits_are_never_read_as_bytes(budget):
    from stepc.schema.units import parse_bytes

    with pytest.raises(ValueError, match="bits"):
        parse_bytes(budget)


def test_force_onto_a_regular_file_names_it_and_leaves_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bad-input").write_text("my notes\n")
    spec = tmp_path / "s.toml"
    spec.write_text(spec_text())
    assert main(["compile", str(spec), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and str(out / "bad-input") in err and "permission" not in err and "Traceback" not in err
    assert (out / "bad-input").read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == ["bad-input"]


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    spec = tmp_path / "s.toml"
    spec.write_text(spec_text())
    assert main(["compile", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "[--out]" in err and "is a file" in err and "Traceback" not in err


def test_force_into_a_directory_that_is_not_a_run_directory(tmp_path, capsys):
    target = tmp_path / "out" / "bad-input"
    target.mkdir(parents=True)
    (target / "thesis.tex").write_text("x")
    spec = tmp_path / "s.toml"
    spec.write_text(spec_text())
    assert main(["compile", str(spec), "--out", str(tmp_path / "out"), "--force"]) == 2
    err = capsys.readouterr().err
    assert "without manifest.json" in err and "Traceback" not in err
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("command", ["compile", "plan"])
def test_fifo_spec_is_refused_without_hanging(tmp_path, command):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "stepc.cli", command, str(fifo)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and str(fifo) in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


@pytest.mark.parametrize("kind", ["directory", "device", "binary", "huge", "latin-1"])
def test_spec_that_is_not_a_spec_file(tmp_path, capsys, kind):
    path = tmp_path / "spec.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "huge":
        path.write_text("# padding\n" * 200_000)
    else:
        path.write_bytes(spec_text().replace("bad-input", "caf\u00e9").encode("latin-1"))
    out = tmp_path / "out"
    assert main(["compile", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:") and "fix:" in err and "Traceback" not in err
    assert not out.exists()


def test_validation_set_that_is_a_training_file_is_a_warning(tmp_path, capsys):
    code, err, _, out = compile_text(tmp_path, spec_text(data__validation={"same": "data/corpus/train/*.txt",
                                                                           "one": "data/corpus/train/hamlet.txt"}), capsys)
    assert code == 0, err
    assert "warning:" in err and "[data.validation.same]" in err and "[data.validation.one]" in err
    assert "memorisation" in err


def test_validation_file_shared_with_training_through_different_globs_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    code, err, _, _ = compile_text(tmp_path, spec_text(data__train=["d/*.txt"], data__validation={"v": "./d/a.*"}), capsys)
    assert code == 0 and "[data.validation.v]" in err and "d/a.txt" in err, err


def test_adapters_never_merged_within_a_stage_is_a_warning(tmp_path, capsys):
    code, err, _, _ = compile_text(tmp_path, spec_text(step__relora_reset_every=5000), capsys)
    assert code == 0, err
    assert "warning:" in err and "[step.relora_reset_every]" in err and "merged only at the stage's end" in err


def test_case_count():
    """The README's reliability table quotes these counts."""
    print(f"\nbad-input cases: {len(RUNTIME_FACING)} runtime-facing, {len(BOUNDS)} bounds, {len(BUDGETS)} budgets/units, "
          f"{len(WRONG_KEY)} wrong-key, {len(CASES)} parametrized in all")
    assert len(CASES) >= 60


# ------------------------------------------------------ third pass (issue 26): the command line itself

BLANK_OPTIONS = [
    (["plan", "{spec}", "--gpu", ""], "--gpu"),
    (["plan", "{spec}", "--gpu", "  "], "--gpu"),
    (["plan", "{spec}", "--gpu-memory", ""], "--gpu-memory"),
    (["compile", "{spec}", "--out", ""], "--out"),
    (["sweep", "{spec}", "--grid", "train.lr=1e-3,3e-4", "--out", " "], "--out"),
    (["eval", "{spec}", "--tasks", ""], "--tasks"),
    (["eval", "{spec}", "--include-path", ""], "--include-path"),
    (["report", "{spec}", "--out", ""], "--out"),
]


@pytest.mark.parametrize("args, option", BLANK_OPTIONS, ids=[" ".join(a[2:]).strip() + f"-{a[0]}" for a, _ in BLANK_OPTIONS])
def test_an_empty_or_blank_option_value_is_an_error_not_a_default(tmp_path, capsys, monkeypatch, args, option):
    """`--gpu ""` used to skip the fit table with exit 0: a blank value is refused like an unknown one."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{spec}", str(spec)) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}: " in err and "is empty" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


# ------------------------------------------------------ third pass (issue 26): errors name the key that is wrong

SOURCE = {"files": ["data/corpus/train/*.txt"], "weight": 1.0}
WRONG_KEY_THIRD = [
    ("source-weight-zero", {"data__train": DELETE, "data__sources": {"web": {**SOURCE, "weight": 0}}},
     "data.sources.web.weight", "greater than 0", "Relative share of training samples"),
    ("source-weight-negative", {"data__train": DELETE, "data__sources": {"web": {**SOURCE, "weight": -0.5}}},
     "data.sources.web.weight", "greater than 0", "Relative share of training samples"),
    ("source-stage-weight-zero", {"data__train": DELETE, "data__sources": {"web": {**SOURCE, "stage_weights": [1.0, 0.0]}}},
     "data.sources.web.stage_weights[1]", "greater than 0", "this source's weight in stage 1, 2"),
    ("source-without-files", {"data__train": DELETE, "data__sources": {"web": {"weight": 0.5}}},
     "data.sources.web.files", "is required but missing", "Files of this source"),
    ("source-key-misspelt", {"data__train": DELETE, "data__sources": {"web": {**SOURCE, "wieght": 0.5}}},
     "data.sources.web.wieght", "did you mean 'data.sources.web.weight'", "remove the key or correct its spelling"),
    ("train-default-beside-sources", {"data__train": ["data/corpus/train/*.txt"], "data__sources": {"web": SOURCE}},
     "data.train", "the blend replaces data.train", "remove data.train"),
    *[(f"extra-{name}", {"launch__slurm__extra": ["--mem=0", line]}, "launch.slurm.extra[1]", said, "its own key")
      for name, line, said in [
          ("nodes", "--nodes=2", "sets --nodes, which stepc controls: launch.nnodes"),
          ("nodes-short", "-N2", "sets -N, which stepc controls: launch.nnodes"),
          ("partition", "--partition=gpu", "launch.slurm.partition"),
          ("partition-abbreviated", "--part=gpu", "sets --partition"),
          ("wrap", "--wrap=hostname", "sets --wrap"),
          ("array", "--array=0-3", "sets --array"),
          ("output", "-o /tmp/x.out", "sets -o"),
          ("bare-word", "exclusive", "is not an sbatch option")]],
]


@pytest.mark.parametrize("changes, key, expected, fix", [c[1:] for c in WRONG_KEY_THIRD], ids=[c[0] for c in WRONG_KEY_THIRD])
def test_the_error_names_the_key_that_is_wrong(tmp_path, capsys, changes, key, expected, fix):
    code, err, spec, out = compile_text(tmp_path, spec_text(**changes), capsys)
    assert_refused(code, err, spec, out, key, expected)
    assert f"[{key}]:" in err.splitlines()[0] and fix in err.split("fix:", 1)[1], err


def test_sbatch_options_stepc_does_not_write_are_accepted_as_extra(tmp_path, capsys):
    extra = ["--mem=0", "--exclusive", "--gpus=2", "--constraint=a100", "-C a100", "--mail-type=END"]
    code, err, _, out = compile_text(tmp_path, spec_text(launch__slurm__extra=extra), capsys)
    assert code == 0, err
    options = [line for line in (out / "bad-input" / "run.sbatch").read_text().splitlines() if line.startswith("#SBATCH -")]
    assert options[-6:] == [f"#SBATCH {line}" for line in extra]


def test_a_set_naming_only_a_sources_weight_blames_the_missing_files(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(data__train=DELETE), encoding="utf-8")
    assert main(["plan", str(spec), "--set", "data.sources.web.weight=0.5"]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: [data.sources.web.files]: is required but missing" in err and "Files of this source" in err, err


NO_EFFECT = [  # (changes, key): a [step] value the method or operator never reads
    ({"experiment__method": "vanilla", "memory__stages": 1, "memory__budget": DELETE, "step__stack_block": 2},
     "step.stack_block"),
    ({"experiment__method": "galore", "memory__stages": 1, "memory__budget": DELETE, "launch__nproc_per_node": 1,
      "train__micro_batch_size": 8, "step__growth_operator": "stack"}, "step.growth_operator"),
    ({"experiment__method": "vanilla", "memory__stages": 1, "memory__budget": DELETE, "step__galore_rank": 64},
     "step.galore_rank"),
    ({"experiment__method": "relora", "memory__stages": 1, "memory__budget": DELETE, "step__relora_warm_start_steps": 10,
      "step__fpi": True}, "step.fpi"),
    ({"step__prune_ratio": 0.5}, "step.prune_ratio"),  # optimizer_reset = "zero" never prunes
    ({"step__growth_operator": "stack-middle", "step__position": "spread"}, "step.position"),
]


@pytest.mark.parametrize("changes, key", NO_EFFECT, ids=[key for _, key in NO_EFFECT])
def test_a_key_the_method_or_operator_never_reads_is_a_warning(tmp_path, capsys, changes, key):
    code, err, spec, _ = compile_text(tmp_path, spec_text(**changes), capsys)
    assert code == 0, err
    assert f"warning: {spec}: [{key}] " in err and "has no effect here" in err and "remove it" in err, err


def test_shipped_specs_restating_defaults_of_other_methods_get_no_such_warning(capsys):
    """The paper's specs keep one [step] table for every method, at its defaults: no noise for them."""
    for spec in sorted((REPO / "specs").glob("*.toml")):
        assert main(["plan", str(spec)]) == 0, spec
        assert "has no effect here" not in capsys.readouterr().err, spec


@pytest.mark.parametrize("item", ['train."lr"=1e-3', "'train'.lr=1e-3", 'train . "lr" = 1e-3'])
def test_quoted_keys_in_set_are_read_as_toml_reads_them(tmp_path, capsys, item):
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(), encoding="utf-8")
    assert main(["compile", str(spec), "--set", item, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "bad-input" / "manifest.json").read_text())
    assert manifest["spec"]["train"]["lr"] == 1e-3 and manifest["overrides"] == {"train.lr": 1e-3}


@pytest.mark.parametrize("flag, item", [
    ("--set", 'train.lr=3e-4\n[log]\nproject = "smuggled" #'),
    ("--set", "train.lr=3e-4\r"),
    ("--set", "log.project=a\tb"),
    ("--set", "train.\x1blr=1"),
    ("--grid", "train.lr=1e-3,3e-4\n[log]"),
])
def test_control_characters_in_set_and_grid_are_refused(tmp_path, capsys, flag, item):
    """A newline ended the `v = VALUE` line the value is parsed from: extra keys reached spec.toml unrecorded."""
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text(), encoding="utf-8")
    command = ["compile", str(spec), "--set", item] if flag == "--set" else ["sweep", str(spec), "--grid", item]
    assert main([*command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: stepc: {flag} '") and "holds the control character" in err and "fix:" in err, err
    assert not (tmp_path / "out").exists()
