"""Growth keys through the real CLI: stacking operators and whole-block layouts compile; misuse exits 2 naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_spec_errors import BASE, to_toml

from stepc.cli import main


def compile_doc(tmp_path: Path, doc: dict[str, Any], capsys) -> tuple[int, str, Path]:
    spec = tmp_path / "g.toml"
    spec.write_text(to_toml(doc))
    out = tmp_path / "out"
    code = main(["compile", str(spec), "--out", str(out)])
    return code, capsys.readouterr().err, out / doc["experiment"]["name"]


def with_(**tables: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["memory"].pop("budget")
    for table, values in tables.items():
        for key, value in values.items():
            if value is None:
                doc[table].pop(key, None)
            else:
                doc[table][key] = value
    return doc


def test_whole_block_layout_reaches_the_manifest(tmp_path, capsys):
    doc = with_(model={"num_layers": 12}, memory={"stages": 3}, step={"growth_operator": "stack-middle", "stack_block": 3})
    code, err, run_dir = compile_doc(tmp_path, doc, capsys)
    assert code == 0, err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    layers = manifest["plan"]["layers"]
    assert sum(layers) == 12 and layers[0] >= 3 and all(n % 3 == 0 for n in layers[1:]), layers
    assert manifest["spec"]["step"]["stack_block"] == 3


@pytest.mark.parametrize("tables,key,words", [
    ({"step": {"growth_operator": "stack", "position": "lower"}}, "step.position", "a stacking operator places its block itself"),
    ({"step": {"stack_block": 2}}, "step.stack_block", 'it applies to growth_operator = "stack" or "stack-middle"'),
    ({"experiment": {"method": "vanilla"}, "memory": {"stages": None}, "step": {"carry_optimizer_state": True}},
     "step.carry_optimizer_state", "it carries state into the next stage; this method has one"),
])
def test_growth_keys_the_method_or_operator_ignores_are_a_warning(tmp_path, capsys, tables, key, words):
    """Consistent with every other [step] key a method never reads (tests/test_bad_input.py): a warning, and
    the run compiles; a stacking operator's own block check and the layout rules below stay errors."""
    code, err, run_dir = compile_doc(tmp_path, with_(**tables), capsys)
    assert code == 0, err
    assert f"warning: {tmp_path / 'g.toml'}: [{key}]" in err and words in err, err


@pytest.mark.parametrize("tables,key,words", [
    ({"step": {"growth_operator": "stack", "stack_block": 4}, "memory": {"stages": 2}}, "step.stack_block", "at least 8 layers"),
    ({"step": {"growth_operator": "stack", "stack_block": 2}, "memory": {"layers": [3, 3], "stages": None}},
     "memory.layers", "whole 2-layer blocks"),
    ({"step": {"growth_operator": "stack", "stack_block": 4}, "memory": {"layers": [2, 4], "stages": None}},
     "memory.layers", "whole 4-layer blocks"),
])
def test_growth_misuse_is_a_user_error(tmp_path, capsys, tables, key, words):
    code, err, run_dir = compile_doc(tmp_path, with_(**tables), capsys)
    assert code == 2, err
    assert f"[{key}]" in err and words in err and "fix:" in err and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("name,method,operator,layers", [
    ("recipe-gstack", "growth", "stack", [3, 3]),
    ("recipe-midas", "growth", "stack-middle", [2, 2, 2]),
    ("recipe-llama-pro", "step", "interpolation-copy", [4, 2]),
])
def test_recipe_specs_compile(tmp_path, capsys, name, method, operator, layers):
    spec = Path(__file__).resolve().parent.parent / "specs" / f"{name}.toml"
    assert main(["compile", str(spec), "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    assert (manifest["spec"]["experiment"]["method"], manifest["spec"]["step"]["growth_operator"]) == (method, operator)
    assert manifest["plan"]["layers"] == layers
    if method == "growth":
        assert all(s["frozen_params"] == 0 for s in manifest["plan"]["stages"])
        assert "all trained" in (tmp_path / name / "stage-2.sh").read_text()
