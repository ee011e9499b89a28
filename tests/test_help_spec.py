"""`stepc help-spec` documents every key a real spec uses: each shipped spec in specs/ and a
weighted blend, walked key by key and looked up in the command's output (its [table] headers and
`key = default` lines), so a key the reference forgets to list (e.g. the keys inside
[data.sources.NAME]) fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.toml"))
BLEND = """
[experiment]
name = "blend"
[model]
hidden_size = 64
num_layers = 2
num_attention_heads = 2
vocab_size = 512
seq_len = 32
[memory]
budget = "1GB"
[data]
tokenizer = "bpe-512"
[data.sources.web]
files = ["data/web/*.parquet"]
weight = 0.7
stage_weights = [0.9, 0.5]
[data.sources.books]
files = ["data/books/*.txt"]
"""


@pytest.fixture(scope="module")
def reference() -> dict[str, set[str]]:
    """help-spec's output as {table: {keys}}; "" is the top level."""
    out = subprocess.run([sys.executable, "-m", "stepc.cli", "help-spec"], check=True, text=True,
                         capture_output=True, cwd=ROOT).stdout
    tables: dict[str, set[str]] = {"": set()}
    table = ""
    for line in out.splitlines():
        if m := re.match(r"^\[([A-Za-z0-9_.]+)\]", line):
            table = m.group(1)
            tables.setdefault(table, set())
        elif m := re.match(r"^  ([a-z_0-9]+) = ", line):
            tables[table].add(m.group(1))
    return tables


def key_paths(doc: dict, table: str = ""):
    """(table, key) for every value in a parsed TOML document; sub-tables recurse."""
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from key_paths(value, f"{table}.{key}" if table else key)
        else:
            yield table, key


def documented(reference: dict[str, set[str]], table: str, key: str) -> bool:
    if key in reference.get(table, set()):
        return True
    parent, _, name = table.rpartition(".")
    # a named entry of a table of sub-tables: [data.sources.web] is documented as [data.sources.NAME]
    if key in reference.get(f"{parent}.NAME", set()):
        return True
    # a free-form name = value table (e.g. [data.validation]) is documented as its key in the parent
    return name in reference.get(parent, set())


@pytest.mark.parametrize("source", [*SPECS, "blend"], ids=lambda s: getattr(s, "name", s))
def test_every_key_of_a_real_spec_is_documented(reference, source):
    doc = tomllib.loads(BLEND if source == "blend" else source.read_text())
    missing = [f"{t}.{k}" if t else k for t, k in key_paths(doc) if not documented(reference, t, k)]
    assert not missing, f"keys missing from `stepc help-spec`: {missing}"



def test_help_spec_filters_to_a_table_and_shows_types(capsys):
    from stepc.cli import main

    assert main(["help-spec", "launch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[launch]") and "[launch.slurm]" in out and "[train]" not in out
    assert "sharding = 'full'    (\"full\" | \"hybrid\")" in out and "nnodes = 1    (int)" in out
    assert "account = None    (string, optional)" in out
    assert main(["help-spec", "[train]"]) == 0
    out = capsys.readouterr().out
    assert "betas = [0.9, 0.95]    (list of float)" in out and "[launch]" not in out
    assert main(["help-spec", "trian"]) == 2
    assert "no spec table [trian]" in capsys.readouterr().err
