"""Every command output shown in README.md and docs/*.md is what the current code prints: a change that
alters a documented output fails here until `python scripts/docs.py` regenerates the pages."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import docs  # noqa: E402  (scripts/docs.py)


def test_documented_outputs_match_the_code(capsys):
    code = docs.run_cog(check=True)
    assert code == 0, "documented outputs drifted; run `python scripts/docs.py`:\n" + capsys.readouterr().out[-4000:]


def test_every_page_shows_at_least_one_generated_output():
    """Pages with command examples keep them generated, not pasted (a pasted `$ stepc plan` block would never be checked)."""
    for page in docs.PAGES:
        text = page.read_text()
        pasted = [line for line in text.splitlines() if line.startswith("$ stepc plan") or line.startswith("$ stepc help-spec")]
        generated = text.count("[[[cog show(")
        assert len(pasted) <= generated, f"{page.name}: a `$ stepc plan` output outside a cog block"
