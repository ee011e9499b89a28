"""`stepc diff` on data: the exact list of `Change`s (path, old, new) and the section each falls in,
for two real manifests that differ in the spec, the emitted files and the environment at once.

The expected changes are derived here from what the test edited and from the two run directories'
bytes on disk, not from the diff code.
"""

from __future__ import annotations

import json
from pathlib import Path

from stepc.cli import main
from stepc.commands.diff import Change, diff, render

TINY = Path(__file__).resolve().parent.parent / "specs" / "tiny-cpu.toml"


def _compile(spec_text: str, out: Path) -> Path:
    spec = out.with_suffix(".toml")
    spec.write_text(spec_text)
    assert main(["compile", str(spec), "--out", str(out)]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def test_diff_changes_and_their_sections(tmp_path, capsys):
    text = TINY.read_text()
    assert text.count("seed = 42") == 1
    a = _compile(text, tmp_path / "a")
    b = _compile(text.replace("seed = 42", "seed = 43"), tmp_path / "b")
    manifest_b = json.loads((b / "manifest.json").read_text())
    old_torch = manifest_b["environment"]["torch"]
    old_version = manifest_b["stepc_version"]
    manifest_b["environment"]["torch"] = "0.0.1-other"
    manifest_b["stepc_version"] = "0.0.0-other"
    (b / "manifest.json").write_text(json.dumps(manifest_b))
    manifest_a = json.loads((a / "manifest.json").read_text())

    changed_files = sorted(name for name in manifest_a["files"]
                           if (a / name).read_bytes() != (b / name).read_bytes())
    assert "spec.toml" in changed_files and "stage-1.sh" not in changed_files  # the seed is read from the manifest
    expected = [("spec", "spec.experiment.seed", 42, 43)]
    expected += [("files", f"files.{name}", manifest_a["files"][name], manifest_b["files"][name]) for name in changed_files]
    expected += [("environment", "environment.torch", old_torch, "0.0.1-other"),
                 ("environment", "stepc_version", old_version, "0.0.0-other")]

    changes = diff(manifest_a, manifest_b)
    assert all(isinstance(c, Change) for c in changes)
    got = sorted((c.section, c.path, c.old, c.new) for c in changes)
    assert got == sorted(expected)  # the content hash differs too, but is never listed

    # render: every spec/plan/file change before the environment heading, every environment change after it
    lines = render(changes).splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("environment"))
    for c in changes:
        (where,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{c.path}:")]
        assert (where > heading) == (c.section == "environment"), (c, lines)

    # the CLI: exit 1 and the same text
    capsys.readouterr()
    assert main(["diff", str(a), str(b / "manifest.json")]) == 1
    assert capsys.readouterr().out.splitlines() == lines


def test_diff_of_environment_only_is_all_environment(tmp_path):
    a = _compile(TINY.read_text(), tmp_path / "a")
    manifest = json.loads((a / "manifest.json").read_text())
    other = json.loads(json.dumps(manifest))
    other["environment"]["numpy"] = "0.0.1-other"
    changes = diff(manifest, other)
    assert [(c.section, c.path, c.old, c.new) for c in changes] == \
           [("environment", "environment.numpy", manifest["environment"]["numpy"], "0.0.1-other")]
    assert diff(manifest, json.loads(json.dumps(manifest))) == []
