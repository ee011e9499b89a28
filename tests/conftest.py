"""Shared fixtures for the runtime tests (test_runtime.py, test_stages.py, test_resume.py).

The runtime tests launch real torchrun jobs (2 gloo ranks on CPU), so everything here is sized to
finish in seconds: a ~0.5 MB corpus, a 4-layer hidden-64 LLaMA, 24 reference steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
TRAIN_FILES = ["comedy_of_errors.txt", "tempest.txt", "midsummer_nights_dream.txt", "julius_caesar.txt"]
VALIDATION_FILE = "macbeth.txt"

# Per-stage torchrun budget: a stage of the test spec takes ~15-30 s on 2 busy cores.
STAGE_TIMEOUT = 240


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~0.5 MB of the demo corpus: 4 training plays and one validation play (built if missing)."""
    if not (CORPUS / "COMPLETE").exists():
        from stepc.commands.corpus import build_corpus

        build_corpus(CORPUS)
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    (root / "validation").mkdir()
    for name in TRAIN_FILES:
        shutil.copy(CORPUS / "train" / name, root / "train" / name)
    shutil.copy(CORPUS / "validation" / VALIDATION_FILE, root / "validation" / VALIDATION_FILE)
    return root


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def spec_tables(corpus: Path, name: str = "rt") -> dict[str, dict[str, Any]]:
    """The test spec as nested dicts ({table: {key: value}}); "data.validation" is a sub-table."""
    return {
        "experiment": {"name": name, "seed": 7, "method": "step"},
        "model": {"hidden_size": 64, "num_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "vocab_size": 512, "seq_len": 64},
        "memory": {"layers": [2, 2], "accounting": "exact"},
        "step": {"lora_rank": 4, "lora_alpha": 8, "relora_reset_every": 8, "restart_warmup_steps": 2},
        "train": {"reference_steps": 24, "global_batch_tokens": 256, "micro_batch_size": 2, "lr": 3e-3,
                  "warmup_steps": 4, "precision": "fp32", "checkpoint_every": 6, "keep_checkpoints": 3},
        "data": {"train": [str(corpus / "train" / "*.txt")], "tokenizer": "bpe-512"},
        "data.validation": {"play": str(corpus / "validation" / "*.txt")},
        "eval": {"every_steps": 12, "max_tokens": 4096},
        "launch": {"nnodes": 1, "nproc_per_node": 2},
    }


def spec_text(tables: dict[str, dict[str, Any]]) -> str:
    """A spec's TOML from ``{table: {key: value}}`` (sub-tables as "data.validation"): the one builder
    of the tests' specs, so no test hand-writes TOML it could get subtly wrong."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def write_spec(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    path.write_text(spec_text(tables), encoding="utf-8")
    return path


class RunFactory:
    """Writes test specs with overrides into a directory and compiles them into run directories."""

    def __init__(self, root: Path, corpus: Path) -> None:
        self.root, self.corpus = root, corpus

    def spec(self, name: str = "rt", **overrides: dict[str, Any]) -> Path:
        """overrides: table=dict of keys to replace, e.g. train={"micro_batch_size": 4}."""
        tables = spec_tables(self.corpus, name)
        for table, values in overrides.items():
            table = table.replace("__", ".")
            tables.setdefault(table, {}).update(values)
        return write_spec(self.root / f"{name}.toml", tables)

    def compile(self, name: str = "rt", **overrides: dict[str, Any]) -> Path:
        spec = self.spec(name, **overrides)
        out = self.root / f"out-{name}"
        from stepc.cli import main

        assert main(["compile", str(spec), "--out", str(out)]) == 0
        run_dir = out / name
        assert (run_dir / "manifest.json").is_file()
        return run_dir


@pytest.fixture
def make_run(tmp_path, small_corpus) -> RunFactory:
    return RunFactory(tmp_path, small_corpus)


def stage_env(nproc: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "default"
    if nproc is not None:
        env["NPROC_PER_NODE"] = str(nproc)
    return env


def run_stage(run_dir: Path, stage: int, *args: str, nproc: int | None = None,
              timeout: float = STAGE_TIMEOUT) -> subprocess.CompletedProcess:
    """Run run_dir/stage-<stage>.sh to completion; returns the CompletedProcess (text output)."""
    return subprocess.run(["bash", str(run_dir / f"stage-{stage}.sh"), *args], env=stage_env(nproc),
                          cwd=run_dir, capture_output=True, text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def start_stage(run_dir: Path, stage: int, log: Path, nproc: int | None = None) -> subprocess.Popen:
    """Start stage-<stage>.sh in a process group of its own (for os.killpg); output goes to `log`."""
    handle = open(log, "w")
    try:
        return subprocess.Popen(["bash", str(run_dir / f"stage-{stage}.sh")], env=stage_env(nproc), cwd=run_dir,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc; Linux only)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(export_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(export_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {export_dir}"
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def first_batch_prefix(run_dir: Path) -> Path:
    """Where `full_run`'s ranks save their first micro-batch of each stage (beside the run directory)."""
    return run_dir.parent / "first-batch"


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, small_corpus) -> Path:
    """The test spec compiled and run through every stage with `stepc run` (2 gloo ranks), once per session.

    Tests must treat it as read-only (copy it first to change anything).
    """
    root = tmp_path_factory.mktemp("full-run")
    run_dir = RunFactory(root, small_corpus).compile("rt")
    env = {**stage_env(), "STEPC_DUMP_FIRST_BATCH": str(first_batch_prefix(run_dir))}  # for test_stages.py
    proc = subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_dir)], env=env,
                          cwd=run_dir, capture_output=True, text=True, timeout=2 * STAGE_TIMEOUT)
    check_ok(proc)
    (run_dir / "stepc-run.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    return run_dir


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """Mount a tmpfs at `path` (root only); skip the test when mounting is not permitted; always unmount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "stepc-test", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount is not permitted here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
