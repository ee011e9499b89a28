"""Regenerate, or check, every command output shown in README.md and docs/*.md.

An output is a cog block (cogapp, the well-kept tool for exactly this: code in a comment, its output
below it) whose generator names the command; the page renders only the fenced output:

    <!-- [[[cog show("stepc plan specs/paper-368m-step2.toml") ]]] -->
    ```
    $ stepc plan specs/paper-368m-step2.toml
    ...
    ```
    <!-- [[[end]]] -->

    python scripts/docs.py          # rewrite every block from the current code
    python scripts/docs.py --check  # exit 1 naming each page whose outputs drifted (tests/test_docs.py)

Commands run in-process through ``stepc.cli.main`` from the repository root, so only commands whose
output is a pure function of the repository are marked (plans, fits, errors, the spec reference);
training logs and benchmark tables are recorded measurements and say where they came from.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_output(command: str) -> str:
    """What ``command`` (a `stepc ...` line) prints, stdout then stderr, run from the repository root."""
    from stepc.cli import main

    argv = shlex.split(command)
    assert argv[0] == "stepc", f"only stepc commands are documented outputs: {command}"
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    try:
        import os

        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv[1:])
    finally:
        os.chdir(cwd)
    return (out.getvalue() + err.getvalue()).rstrip("\n")


def show(command: str, start: str | None = None) -> None:
    """Emit ``command``'s output as a fenced block (cog's ``outl``); with ``start``, from the first line
    that begins with it (an elision mark shows that lines were left out)."""
    import cog

    text = command_output(command).splitlines()
    if start is not None:
        first = next(i for i, line in enumerate(text) if line.startswith(start))
        text = ["..."] + text[first:]
    cog.outl("```")
    cog.outl(f"$ {command}")
    for line in text:
        cog.outl(line)
    cog.outl("```")


def run_cog(check: bool, pages: list[Path] = PAGES) -> int:
    from cogapp import Cog

    args = ["cog", "-I", str(Path(__file__).parent), "-p", "from docs import show"]
    args += ["--check", "--diff"] if check else ["-r"]
    return Cog().main([*args, *map(str, pages)])


if __name__ == "__main__":
    sys.exit(run_cog(check="--check" in sys.argv[1:]))
