"""Property test: mutated specs either compile or fail as a user error, never anything in between.

Hypothesis builds a small valid planning spec (hidden 64..512, 2..16 layers, so a compile takes a
fraction of a second), applies 1-3 random mutations (a value of another TOML type, out-of-range,
huge, negative, NaN/inf numbers, unknown keys at any level, deleted keys and tables, unicode and
control characters, empty strings, 50-level nested tables), writes it as TOML and runs
`stepc compile` in-process. The contract (the README's exit codes):

* exit 0: OUT/<experiment.name>/manifest.json exists (and is strict JSON) and nothing else is in OUT;
* exit 2: stderr starts with "error:", names the spec file, a "[key.path]" and a "fix:", has no
  traceback, and OUT holds no run directory, complete or partial;
* anything else (another exit code, an exception escaping `main`) fails the test.

Derandomized (and without an example database) so CI sees the same 500 examples on every run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepc.cli import main

MAX_EXAMPLES = 500

# ---------------------------------------------------------------------------------------------
# A tiny TOML writer (tomli_w is not a dependency). Every key is written as a quoted key, every
# table below the root as a [section] header, tables inside arrays as inline tables.


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control characters (tab aside; escape it too)
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    scalars = [(k, v) for k, v in doc.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in doc.items() if isinstance(v, dict)]
    text = ""
    if prefix:
        text += "[" + ".".join(_toml_string(p) for p in prefix) + "]\n"
    text += "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in scalars)
    for key, table in tables:
        text += "\n" + to_toml(table, prefix + (key,))
    return text


# ---------------------------------------------------------------------------------------------
# Valid base specs.


@st.composite
def base_specs(draw) -> dict[str, Any]:
    head_dim = draw(st.sampled_from([16, 32, 64]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if 64 <= h * head_dim <= 512]))
    hidden = heads * head_dim
    layers = draw(st.integers(2, 16))
    method = draw(st.sampled_from(["step", "step", "step", "vanilla", "relora"]))
    stages = draw(st.integers(1, min(3, layers))) if method == "step" else 1
    seq_len, micro, ranks = draw(st.sampled_from([64, 128])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    spec: dict[str, Any] = {
        "experiment": {"name": "fuzz", "seed": draw(st.integers(0, 1000)), "method": method},
        "model": {"hidden_size": hidden, "num_layers": layers, "num_attention_heads": heads,
                  "num_key_value_heads": draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0])),
                  "vocab_size": 4096, "seq_len": seq_len},
        "memory": {"stages": stages, "solver": "glpk",
                   "accounting": draw(st.sampled_from(["paper", "exact", "device"]))},
        "step": {"lora_rank": 16, "grow_at": 0.75, "relora_reset_every": 100, "restart_warmup_steps": 10,
                 "relora_warm_start_steps": 10},
        "train": {"reference_steps": 200, "global_batch_tokens": seq_len * micro * ranks * 2,
                  "micro_batch_size": micro, "lr": 3e-3, "warmup_steps": 10, "betas": [0.9, 0.95], "precision": "fp32"},
        "data": {"train": ["data/corpus/train/*.txt"], "text_field": "text", "tokenizer": "bpe-4096",
                 "validation": {"milton": "data/corpus/validation/*.txt"}},
        "eval": {"every_steps": 50, "max_tokens": 65536},
        "launch": {"nnodes": 1, "nproc_per_node": ranks,
                   "slurm": {"partition": "debug", "time": "00:30:00", "gpus_per_node": 0, "extra": ["--exclusive"]}},
    }
    if draw(st.booleans()):
        spec["memory"]["budget"] = draw(st.sampled_from(["1GB", "40MB", "2GiB", 10**10]))
    return spec


# ---------------------------------------------------------------------------------------------
# Mutations.

NASTY_STRINGS = [
    "", " ", "auto", "glpk", "gpt2", "bpe-", "bpe-99999999999999999999", "bpe-4096", "heldout", "3.5GB", "-1GB",
    "0.0000001B", "1e999999999999GB", "1e-999999999999GB", "9" * 400 + "TB", "nanGB", "infGB", "NaN", "inf",
    "24:00:00", "99-99:99:99", "\u0664\u0662:\u0660\u0660:\u0660\u0660", "a\nb", "\r\n", "\x00", "\x1b[31m",
    "\x7f", "\u2028", "\u0085", "\ufeff", "\U0001F600", "caf\u00e9", "../../etc/passwd", "$(touch PWNED)",
    "`touch PWNED`", "a'b\"c", "x" * 300, "\\", "{{ name }}", "{% raw %}",
]
SPECIAL_INTS = [0, -1, 1, 2, 3, -(2**63), 2**63 - 1, 2**64, 10**30, -(10**30), 2**32, 65535, 65536, 1023]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 1e308, 5e-324, -1.5, 0.999999, 1.0000001, 1e30]
SPECIAL_DATES = [dt.datetime(1979, 5, 27, 7, 32), dt.date(2024, 1, 1), dt.time(7, 32)]

sizes = st.one_of(  # memory.budget: the one field with its own little parser
    st.sampled_from(["1e999999999999GB", "1e999999GB", "9" * 400 + "TB", "1e-999999999999GB", "0.5B", "1.B", ".5GB",
                     "1e18B", "1000000000000000001B", "3.5 GB", " 8GiB ", "8gib", "8 GiBs", "-1GB", "+1GB", "1_000GB",
                     "0x10GB", "٣GB", "1e3", "GB", "", 10**30, 10**400, 2**63, 0, -1]),
    st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(-10, 10**6), st.floats(0, 1e6), st.sampled_from([1e300, 1e-300])),
              st.sampled_from(["", "B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "PB", "G"])),
)

KNOWN_KEYS = ["experiment", "model", "memory", "step", "train", "data", "eval", "launch", "slurm", "name", "seed",
              "hidden_size", "num_layers", "budget", "stages", "layers", "validation", "partition", "extra"]

keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS).map(lambda k: k[:-1] + "x"),  # near misses: "did you mean"
    st.text(min_size=0, max_size=12),  # anything, control characters and the empty key included
)
scalars = st.one_of(
    st.integers(-5, 10_000),
    st.sampled_from(SPECIAL_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_FLOATS),
    st.booleans(),
    st.text(max_size=16),
    st.sampled_from(NASTY_STRINGS),
    st.sampled_from(SPECIAL_DATES),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=3)),
    max_leaves=6,
)


def _locations(node: Any, path: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) below `node`."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append(path + (key,))
        out.extend(_locations(child, path + (key,)))
    return out


def _tables(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(node, dict) else []
    if isinstance(node, dict):
        for key, child in node.items():
            out.extend(_tables(child, path + (key,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _nested(depth: int, leaf: Any) -> dict[str, Any]:
    table: Any = leaf
    for i in range(depth):
        table = {f"level{depth - i}": table}
    return table


def _perturb_number(draw, value: float) -> Any:
    kind = draw(st.sampled_from(["neg", "zero", "huge", "scale", "special", "float-of-int"]))
    if kind == "neg":
        return -value if value else -1
    if kind == "zero":
        return type(value)(0)
    if kind == "huge":
        return 10**30 if isinstance(value, int) else 1e300
    if kind == "scale":
        return value * draw(st.sampled_from([2, 3, 7, 10, 1000]))
    if kind == "special":
        return draw(st.sampled_from(SPECIAL_INTS if isinstance(value, int) else SPECIAL_FLOATS))
    return float(value) if isinstance(value, int) else int(value) if math.isfinite(value) else value


def _mutate_string(draw, value: str) -> str:
    kind = draw(st.sampled_from(["replace", "insert", "empty", "upper"]))
    if kind == "replace":
        return draw(st.one_of(st.text(max_size=20), st.sampled_from(NASTY_STRINGS)))
    if kind == "insert":
        at = draw(st.integers(0, len(value)))
        return value[:at] + draw(st.sampled_from(NASTY_STRINGS[1:] + ["\n", "\t", ";", " "])) + value[at:]
    if kind == "empty":
        return ""
    return value.upper()


# Runtime-facing values: what compile must judge exactly as the runtime will (issue 14).
DATA_PATHS = ["", " ", "data/*.csv", "data/x.json", "data/dir", "data/dir/", "data/**", "data/*", "data/x.*",
              "data/corpus/train/*.txt", "data/x.jsonl", "data/x.parquet", "data/x.TXT", "data/x.txt ", " data/x.txt",
              "./a.txt", "../b.jsonl", "/abs/c.parquet", "data/[ab].txt", "data/x.txt.gz", "data/x.txt/", "\\x.txt",
              "data/\u0664.txt", "data/*.txt\n", "data/?", "data/x.txt]"]
TOKENIZER_NAMES = ["gpt2", "GPT2", "gpt-2", "bpe-", "bpe-0", "bpe-256", "bpe-257", "bpe-511", "bpe-512", "bpe-4096",
                   "bpe-4097", "bpe-05000", "bpe-\u0664\u0660\u0669\u0666", "bpe-\u00b2", "bpe-\uff14\uff10\uff19\uff16",
                   "BPE-512", "bpe-512 ", "bpe--1", "bpe-1e3", "bpe-" + "9" * 30, "./tok", "tok/tokenizer.json",
                   "bpe-dir/tokenizer.json", " ", "llama"]
VALIDATION_NAMES = ["1st", "heldout", "a b", "x", "caf\u00e9", "", "a-b", "_x", "x" * 70, "HeldOut", "a.b", "-a", "\u0661"]
data_paths = st.one_of(st.sampled_from(DATA_PATHS),
                       st.builds(lambda stem, ext: stem + ext, st.text(max_size=8),
                                 st.sampled_from([".txt", ".jsonl", ".parquet", ".csv", "", "/*.txt", ".*", "/"])))
tokenizer_names = st.one_of(st.sampled_from(TOKENIZER_NAMES),
                            st.builds(lambda n: f"bpe-{n}", st.integers(-10, 10**6)))


def _mutate_runtime_facing(draw, doc: dict[str, Any]) -> None:
    data = doc.setdefault("data", {}) if isinstance(doc.get("data", {}), dict) else {}
    which = draw(st.sampled_from(["train", "tokenizer", "validation"]))
    if which == "train":
        data["train"] = draw(st.lists(data_paths, max_size=3))
    elif which == "tokenizer":
        data["tokenizer"] = draw(tokenizer_names)
    else:
        data["validation"] = draw(st.dictionaries(st.one_of(st.sampled_from(VALIDATION_NAMES), st.text(max_size=6)),
                                                  data_paths, max_size=3))


@st.composite
def mutations(draw, doc: dict[str, Any]) -> str:
    """Apply one mutation to `doc` in place; return a short label of what was done."""
    kind = draw(st.sampled_from(["retype", "perturb", "delete", "unknown-key", "deep-nest", "string", "budget",
                                 "runtime-facing", "runtime-facing"]))
    locations = _locations(doc)
    if kind == "budget" and isinstance(doc.get("memory"), dict):
        doc["memory"]["budget"] = draw(sizes)
        return kind
    if kind == "runtime-facing":
        _mutate_runtime_facing(draw, doc)
        return kind
    if kind == "perturb":
        numeric = [p for p in locations if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]
        if numeric:
            path = draw(st.sampled_from(numeric))
            _get(doc, path[:-1])[path[-1]] = _perturb_number(draw, _get(doc, path))
            return kind
        kind = "retype"
    if kind == "string":
        strings = [p for p in locations if isinstance(_get(doc, p), str)]
        if strings:
            path = draw(st.sampled_from(strings))
            _get(doc, path[:-1])[path[-1]] = _mutate_string(draw, _get(doc, path))
            return kind
        kind = "retype"
    if kind in ("retype", "delete") and not locations:
        kind = "unknown-key"
    if kind == "retype":
        path = draw(st.sampled_from(locations))
        _get(doc, path[:-1])[path[-1]] = draw(values)
    elif kind == "delete":
        path = draw(st.sampled_from(locations))
        del _get(doc, path[:-1])[path[-1]]
    elif kind == "unknown-key":
        table = _get(doc, draw(st.sampled_from(_tables(doc))))
        table[draw(keys)] = draw(values)
    else:  # deep-nest: a 50-level table where a key (known or not) was
        table = _get(doc, draw(st.sampled_from(_tables(doc))))
        key = draw(st.sampled_from(sorted(table)) if table and draw(st.booleans()) else keys)
        table[key] = _nested(50, draw(scalars))
    return kind


# ---------------------------------------------------------------------------------------------
# The property.

KEY_PATH = re.compile(r"\[[^\]\n]+\]")


def _strict_json(text: str) -> Any:
    def reject(constant: str) -> None:
        raise AssertionError(f"manifest.json contains {constant}, which is not JSON")

    return json.loads(text, parse_constant=reject)


def check_contract(doc: dict[str, Any], root: Path, capsys) -> int:
    """Compile `doc` in a fresh directory under `root`; assert the exit-code contract; return the code."""
    text = to_toml(doc)
    workdir = Path(tempfile.mkdtemp(dir=root))
    try:
        spec = workdir / "fuzz spec.toml"
        spec.write_text(text, encoding="utf-8")
        out = workdir / "out"
        capsys.readouterr()
        code = main(["compile", str(spec), "--out", str(out)])
        captured = capsys.readouterr()
        leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
        note = f"spec:\n{text}\nstderr:\n{captured.err}"
        assert code in (0, 2), note
        assert "Traceback" not in captured.err, note
        if code == 2:
            assert captured.err.startswith("error:"), note
            assert str(spec) in captured.err, note
            assert KEY_PATH.search(captured.err), note
            assert "fix:" in captured.err, note
            assert leftovers == [], f"partial run directory {leftovers}\n{note}"
        else:
            assert len(leftovers) == 1, f"expected exactly one run directory, found {leftovers}\n{note}"
            manifest = out / leftovers[0] / "manifest.json"
            assert manifest.is_file(), note
            runtime_accepts(_strict_json(manifest.read_text(encoding="utf-8"))["spec"]["data"], root)
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def runtime_accepts(data: dict[str, Any], root: Path) -> None:
    """What compile accepted, the runtime's own code accepts too: its tokenizer loader gets past the name
    (a bpe-N name then fails only for want of training files), and every data path that ends in literal
    text names a file type the runtime's reader supports."""
    from stepc.runtime.data.documents import SUFFIXES
    from stepc.runtime.data.tokenizer import load_tokenizer

    name = data["tokenizer"]
    if name.lower().startswith("bpe-") and "/" not in name and not name.endswith(".json"):
        with pytest.raises(ValueError, match="needs at least one training file"):
            load_tokenizer(name, [], lambda: iter(()), root / "cache")
    for pattern in data["train"] + list(data["validation"].values()):
        last = pattern.rsplit("/", 1)[-1]
        if last and last[-1] not in "*?]":
            assert Path(last).suffix in SUFFIXES, f"compile accepted {pattern!r}, which the runtime cannot read"


def test_mutated_specs_compile_or_fail_cleanly(capsys, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    stats: Counter[str] = Counter()
    start = time.perf_counter()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(base=base_specs(), data=st.data())
    def check(base: dict[str, Any], data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="mutation count")):
            stats["mutation:" + data.draw(mutations(base))] += 1
        code = check_contract(base, root, capsys)
        stats["examples"] += 1
        stats[f"exit {code}"] += 1

    check()
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        summary = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
        print(f"\nfuzz: {stats['examples']} examples in {elapsed:.1f} s ({summary})")
    assert stats["examples"] >= MAX_EXAMPLES


TINY = {"experiment": {"name": "regression"},
        "model": {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4, "vocab_size": 4096, "seq_len": 64},
        "memory": {"stages": 2}, "step": {"lora_rank": 16},
        "train": {"reference_steps": 100, "global_batch_tokens": 512, "micro_batch_size": 1, "warmup_steps": 10},
        "data": {"tokenizer": "bpe-4096"}, "launch": {"nproc_per_node": 1}}

# Inputs that once escaped the contract (tracebacks, hangs, or a wrong diagnosis), pinned as examples.
REGRESSIONS = {
    "budget-decimal-overflow": ({"memory": {"budget": "1e999999999999GB"}}, "memory.budget"),  # decimal.Overflow
    "budget-huge-exponent": ({"memory": {"budget": "1e999999GB"}}, "memory.budget"),
    "budget-400-digits": ({"memory": {"budget": "9" * 400 + "TB"}}, "memory.budget"),  # float overflow in the report
    "budget-huge-int": ({"memory": {"budget": 10**400}}, "memory.budget"),
    "budget-huge-int-auto": ({"memory": {"budget": 10**30, "stages": "auto"}}, "memory.budget"),
    "layers-1e30": ({"model": {"num_layers": 10**30}}, "model.num_layers"),  # GLPK "unbounded", blamed on the solver
    "layers-1e9": ({"model": {"num_layers": 10**9}}, "model.num_layers"),  # O(K L) layout search: minutes, GBs
    "slurm-time-unicode-digits": ({"launch": {"slurm": {"time": "\u0662\u0664:\u0660\u0660:\u0660\u0660"}}},
                                  "launch.slurm.time"),
}


def _merge(base: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in edit.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("edit, key", list(REGRESSIONS.values()), ids=list(REGRESSIONS))
def test_regressions_fail_cleanly(edit, key, capsys, tmp_path):
    assert check_contract(_merge(TINY, edit), tmp_path, capsys) == 2
    # check_contract consumed the output; compile once more to see which key was blamed
    spec = tmp_path / "spec.toml"
    spec.write_text(to_toml(_merge(TINY, edit)), encoding="utf-8")
    assert main(["compile", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert f"[{key}]" in capsys.readouterr().err


def test_tiny_regression_base_compiles(capsys, tmp_path):
    assert check_contract(TINY, tmp_path, capsys) == 0


# ---------------------------------------------------------------------------------------------
# The commands that read run directories (verify, diff, report, eval) fed malformed ones.

RUNDIR_EXAMPLES = 120
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=12), st.sampled_from(["sha256:" + "0" * 64, "../x", "/etc/hostname", "plan.md", ""])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8,
)
METRIC_LINES = st.one_of(
    st.builds(lambda stage, step, loss: json.dumps({"event": "train", "stage": stage, "step": step, "loss": loss}),
              st.integers(0, 3), st.integers(-2, 400), st.one_of(st.floats(0, 10), st.text(max_size=3), st.none())),
    st.builds(lambda stage, step, ppl: json.dumps({"event": "eval", "stage": stage, "step": step, "ppl_heldout": ppl}),
              st.integers(0, 3), st.integers(0, 400), st.one_of(st.floats(1, 1e4), st.text(max_size=3))),
    st.builds(lambda stage: json.dumps({"event": "stage_end", "stage": stage, "step": 1}), st.integers(0, 3)),
    JSON_VALUES.map(json.dumps), st.text(max_size=20),
)


def _leaf_paths(node: Any, path: tuple = ()) -> list[tuple]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out = [path] if path else []
    for key, child in items:
        out.extend(_leaf_paths(child, path + (key,)))
    return out


def _replace(path: Path) -> Path:
    """`path`, with whatever an earlier mutation put there (a directory, a FIFO, a link) removed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()
    return path


@st.composite
def rundir_mutations(draw, run_dir: Path, outside: Path) -> str:
    """Damage the run directory `run_dir` in one way; return a label."""
    from stepc.compiler.manifest import dumps
    from stepc.hashing import content_hash

    kind = draw(st.sampled_from(["manifest-value", "manifest-leaf", "manifest-delete", "file", "metrics", "eval-json",
                                 "spec-text"]))
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (ValueError, OSError):
        manifest = None
    if kind in ("manifest-leaf", "manifest-delete") and not _leaf_paths(manifest):
        kind = "manifest-value"  # an earlier mutation left nothing to edit
    if kind == "manifest-value":
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        path.unlink(missing_ok=True)
        path.write_text(json.dumps(draw(JSON_VALUES)))
    elif kind in ("manifest-leaf", "manifest-delete"):
        target = draw(st.sampled_from(_leaf_paths(manifest)))
        parent = _get(manifest, target[:-1])
        if kind == "manifest-delete":
            del parent[target[-1]]
        else:
            parent[target[-1]] = draw(JSON_VALUES)
        if isinstance(manifest, dict) and draw(st.booleans()):  # (an earlier draw may have left a list)
            manifest["hash"] = content_hash(manifest)  # re-sealed: only the shape check can tell
        path.write_text(dumps(manifest))
    elif kind == "file":
        name = draw(st.sampled_from(sorted(p.name for p in run_dir.iterdir())))
        victim = run_dir / name
        how = draw(st.sampled_from(["delete", "truncate", "directory", "symlink", "fifo", "binary"]))
        if victim.is_dir() and not victim.is_symlink():
            shutil.rmtree(victim)
        else:
            victim.unlink()
        if how == "truncate":
            victim.write_bytes(b"")
        elif how == "directory":
            victim.mkdir()
        elif how == "symlink":
            victim.symlink_to(outside)
        elif how == "fifo":
            os.mkfifo(victim)
        elif how == "binary":
            victim.write_bytes(bytes(range(256)))
        kind += "-" + how
    elif kind == "metrics":
        lines = draw(st.lists(METRIC_LINES, max_size=6))
        _replace(run_dir / "metrics.jsonl").write_text("\n".join(lines) + draw(st.sampled_from(["\n", ""])))
    elif kind == "eval-json":
        _replace(run_dir / "eval.json").write_text(json.dumps(draw(JSON_VALUES)))
    else:
        _replace(run_dir / "spec.toml").write_text(draw(st.sampled_from(["", "[model]\nhidden_size = 1\n", "\ufeff", "a = = b"])))
    return kind


def test_commands_on_malformed_run_dirs_fail_cleanly(capsys, tmp_path_factory):
    """verify/diff/report/eval on damaged run directories: exit 0, 1 or 2, never an exception or a hang;
    exit 2 names a file and a fix and writes no report; verify's findings end in FAILED."""
    root = tmp_path_factory.mktemp("fuzz-rundirs")
    spec = root / "spec.toml"
    spec.write_text(to_toml(TINY), encoding="utf-8")
    assert main(["compile", str(spec), "--out", str(root / "template")]) == 0
    template = root / "template" / "regression"
    outside = root / "outside.txt"
    outside.write_text("not part of any run\n")
    stats: Counter[str] = Counter()

    @settings(max_examples=RUNDIR_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        work = Path(tempfile.mkdtemp(dir=root))
        try:
            run_dir = work / "regression"
            shutil.copytree(template, run_dir, symlinks=True)
            labels = [data.draw(rundir_mutations(run_dir, outside)) for _ in range(data.draw(st.integers(1, 3)))]
            report_out = work / "report"
            for args in (["verify", str(run_dir)], ["diff", str(template), str(run_dir)],
                         ["report", str(run_dir), "--out", str(report_out)], ["eval", str(run_dir)]):
                capsys.readouterr()
                code = main(args)
                captured = capsys.readouterr()
                note = f"{args[0]} after {labels}:\n{captured.out}\n{captured.err}"
                assert code in (0, 1, 2) and "Traceback" not in captured.err + captured.out, note
                if code == 2:
                    assert captured.err.startswith("error:") and "fix:" in captured.err, note
                if args[0] == "verify" and code == 1:
                    assert "FAILED" in captured.out, note
                if args[0] == "report" and code == 2:
                    assert not report_out.exists(), note
                stats[f"{args[0]} exit {code}"] += 1
            for label in labels:
                stats[label] += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()
    with capsys.disabled():
        print("\nrun-dir fuzz: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    assert stats["verify exit 1"] > RUNDIR_EXAMPLES // 2
