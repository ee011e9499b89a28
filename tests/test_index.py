"""tests/README.md's "Where each module is tested" names every module of the package and only test files
that exist, and every test file appears in it: a new module or test file without a row fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def index_rows() -> dict[str, str]:
    text = (ROOT / "tests" / "README.md").read_text()
    section = text.split("## Where each module is tested", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(stepc/[\w/]+\.py)` \| (.+) \|$", section, re.M))


def test_every_module_has_a_row_naming_existing_tests():
    rows = index_rows()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "stepc").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - set(rows)) == [], "modules without a row in tests/README.md's index"
    assert sorted(set(rows) - modules) == [], "rows for modules that no longer exist"
    for module, cell in rows.items():
        named = re.findall(r"test_\w+\.py", cell)
        assert named or cell.startswith("none: "), f"{module}: name its tests, or say 'none: ' and why"
        for name in named:
            assert (ROOT / "tests" / name).is_file(), f"{module}: {name} does not exist"


def test_every_test_file_is_listed():
    text = (ROOT / "tests" / "README.md").read_text().split("## Where each module is tested", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"test_\w+\.py", text))
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(files - listed) == []


def test_no_source_line_is_longer_than_the_projects_limit():
    """130 characters (the project's limit; docstrings and error texts included, wrapped where they are written)."""
    sources = [p for folder in ("stepc", "tests", "bench", "scripts") for p in (ROOT / folder).rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}:{i}" for p in sources for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > 130]
    assert long == []
