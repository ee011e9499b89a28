"""User-facing errors: everything a researcher can fix by editing a spec or the environment.

The CLI turns a `UserError` into one paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UserError(Exception):
    """A problem the user can fix. `key` is the TOML key path (e.g. ``memory.budget``)."""

    message: str
    file: str | None = None
    key: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        where = self.file or "stepc"
        if self.key:
            where += f": [{self.key}]"
        text = f"{where}: {self.message}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text
