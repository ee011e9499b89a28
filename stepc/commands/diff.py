"""Semantic diff of two manifests: field paths with old -> new, environment reported apart.

Diffs are data (a list of `Change`), rendered last, so tests and tools can inspect them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IGNORED = {"hash"}  # derived from the rest; a differing hash is explained by the fields that differ


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    @property
    def section(self) -> str:
        top = self.path.split(".", 1)[0].split("[", 1)[0]
        return "environment" if top == "stepc_version" else top  # a version, like torch's: not the experiment


def diff(old: Any, new: Any, path: str = "") -> list[Change]:
    """Every leaf that differs, by dotted path (list items as [i])."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[Change] = []
        for key in sorted(set(old) | set(new)):
            if not path and key in IGNORED:
                continue
            sub = f"{path}.{key}" if path else key
            changes += diff(old.get(key, _MISSING), new.get(key, _MISSING), sub)
        return changes
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [Change(path, old, new)]


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def render(changes: list[Change]) -> str:
    """Spec/plan/file changes first, then environment changes under their own heading."""
    if not changes:
        return "identical"
    semantic = [c for c in changes if c.section != "environment"]
    env = [c for c in changes if c.section == "environment"]
    lines = [f"{c.path}: {_show(c.old)} -> {_show(c.new)}" for c in semantic]
    if env:
        alone = "environment (versions; the experiment itself is the same unless listed above):"
        lines.append(alone if not semantic else "environment:")
        lines += [f"  {c.path}: {_show(c.old)} -> {_show(c.new)}" for c in env]
    return "\n".join(lines)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, _Missing) else json.dumps(value, ensure_ascii=False)
