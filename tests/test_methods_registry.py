"""The method registry (stepc/schema/methods.py) is the only place that tells methods apart: code asks
a method's traits, so a new method is one entry, not edits across the tree."""

from __future__ import annotations

import re
from pathlib import Path

from stepc.schema.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "stepc"
# a method name compared or tested for membership: method == "galore", .method in ("step", "growth")
COMPARISON = re.compile(r"""method\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\["']""")


def test_no_module_compares_method_names():
    hits = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
            for path in sorted(PACKAGE.rglob("*.py")) if path.name != "methods.py"
            for i, line in enumerate(path.read_text().splitlines(), 1) if COMPARISON.search(line)]
    assert not hits, "ask the registry's traits instead:\n" + "\n".join(hits)


def test_every_method_the_spec_accepts_has_an_entry():
    from typing import get_args

    from stepc.schema.spec import Experiment

    assert set(get_args(Experiment.model_fields["method"].annotation)) == set(METHODS)
