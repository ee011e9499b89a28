"""`--set KEY=VALUE` overrides: applied to the spec file's TOML before validation, recorded after.

A value is a TOML value (`3e-4`, `true`, `[7, 5]`, `"gpu"`); a bare word that is not valid TOML
(`--set launch.slurm.partition=gpu`) is taken as a string, as a researcher would expect. The
overridden spec is validated exactly like a file, so errors name the same key paths and say the
value came from --set. The resolved spec text (the user's file with the values replaced in place,
comments kept, by tomlkit) is what goes into the run directory's spec.toml, so `stepc diff` and
`stepc verify` see exactly what ran; the manifest records the overrides themselves as well.
"""

from __future__ import annotations

import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stepc.errors import UserError


@dataclass(frozen=True)
class Override:
    key: str  # dotted TOML key path, e.g. "train.lr"
    value: Any  # the parsed TOML value
    text: str  # as the user wrote it (KEY=VALUE), for messages
    raw: str = ""  # the value as written, kept in the resolved spec.toml (3e-4 stays 3e-4)
    source: str = "--set"  # where it came from, for messages: --set, --grid, stepc sweep
    path: tuple[str, ...] = ()  # the key's parts as TOML reads them (a quoted part may hold a dot)

    @property
    def parts(self) -> list[str]:
        return list(self.path) if self.path else self.key.split(".")


def parse_value(raw: str) -> Any:
    """A TOML value; a bare word that is not TOML is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_override(item: str, flag: str = "--set") -> Override:
    """KEY=VALUE, the key in TOML's own key syntax (bare or quoted parts: train.lr, train."lr").

    A control character anywhere is refused: a newline in the value would end the `v = VALUE` line this
    is parsed from and smuggle further keys and tables into the run's spec.toml, unrecorded."""
    bad = next((ch for ch in item if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        raise UserError(f"{flag} {item!r} holds the control character {bad!r}; a value is one line of TOML",
                        fix=f"write the value on one line; inside a TOML string use an escape such as \\n, e.g. "
                            f"{flag} 'log.project=\"a\\nb\"'")
    for at in (i for i, ch in enumerate(item) if ch == "="):  # the first '=' that ends a valid key ('=' may be quoted)
        parts = _key_parts(item[:at])
        if parts is not None:
            raw = item[at + 1:].strip()
            key = ".".join(parts)
            return Override(key, parse_value(raw), f"{key}={raw}", raw, flag, tuple(parts))
    raise UserError(f"{flag} {item!r} is not KEY=VALUE with a dotted TOML key",
                    fix=f"write e.g. {flag} train.lr=3e-4 (`stepc help-spec` lists every key)")


def _key_parts(text: str) -> list[str] | None:
    """The parts of a TOML key (`a.b`, `a."b"`, `'a'.b`), or None when `text` is not one."""
    if not text.strip():
        return None
    try:
        doc = tomllib.loads(f"{text.strip()} = 0")
    except tomllib.TOMLDecodeError:
        return None
    parts: list[str] = []
    while isinstance(doc, dict) and len(doc) == 1:
        (name, doc), = doc.items()
        parts.append(name)
    return parts if doc == 0 and parts else None


def parse_overrides(items: list[str] | None, flag: str = "--set") -> list[Override]:
    overrides = [parse_override(item, flag) for item in items or []]
    check_distinct(overrides)
    return overrides


def check_distinct(overrides: list[Override]) -> None:
    """No key given twice (train=... and train.lr=... would silently shadow each other)."""
    seen: list[Override] = []
    for o in overrides:
        for other in seen:
            if o.key == other.key or o.key.startswith(other.key + ".") or other.key.startswith(o.key + "."):
                raise UserError(f"{other.source} {other.text} and {o.source} {o.text} set the same key", key=o.key,
                                fix=f"give {o.key} once")
        seen.append(o)


def apply_overrides(text: str, overrides: list[Override], file: str) -> str:
    """The spec text with every override written into its table (tables are created as needed)."""
    if not overrides:
        return text
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    try:
        doc = tomlkit.parse(text)
    except TOMLKitError:
        return text  # validation reports the syntax error with tomllib's line and column
    for o in overrides:
        node: Any = doc
        for depth, part in enumerate(o.parts[:-1]):
            if part not in node:
                node[part] = tomlkit.table()
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(o.parts[: depth + 1])
                raise UserError(f"--set {o.text}: [{where}] is a value, not a table", file=file, key=o.key,
                                fix=f"set {where} itself, e.g. --set {where}=...")
        try:
            node[o.parts[-1]] = tomlkit.parse(f"v = {o.raw}")["v"]  # the user's spelling of the value
        except TOMLKitError:
            node[o.parts[-1]] = o.value  # a bare word: a string
    header = "# Resolved by stepc: " + ", ".join(f"{o.source} {o.text}" for o in overrides) + " (values below)\n"
    return header + tomlkit.dumps(doc)


def resolve(path: str | Path, items: list[str] | None, flag: str = "--set") -> tuple[str, list[Override]]:
    """(the spec file's text with the overrides applied, the overrides) for a spec file and --set items."""
    from stepc.compiler.load import read_spec_text

    overrides = parse_overrides(items, flag)
    return apply_overrides(read_spec_text(path), overrides, str(path)), overrides


def recorded(overrides: list[Override]) -> dict[str, Any]:
    """What the manifest records: key path -> value."""
    return {o.key: o.value for o in overrides}


@contextmanager
def blamed(overrides: list[Override]) -> Iterator[None]:
    """Re-raise a UserError from validating or planning the overridden spec with the --set it came from."""
    try:
        yield
    except UserError as err:
        if overrides:
            raise blame(err, overrides) from None
        raise


def blame(err: UserError, overrides: list[Override]) -> UserError:
    """Say which --set an error came from (the key itself, a key under it, or one the check involves)."""
    key = err.key or ""
    culprit = next((o for o in overrides if key == o.key or key.startswith(o.key + ".") or o.key.startswith(key + ".")), None)
    if culprit is not None:
        err.message += f" (the value came from {culprit.source} {culprit.text})"
    else:
        err.message += " (with " + ", ".join(f"{o.source} {o.text}" for o in overrides) + " applied)"
    return err
