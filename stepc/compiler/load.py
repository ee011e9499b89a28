"""Parse a TOML spec into a validated, normalised `Spec`, turning every problem into a `UserError`.

Errors name the file, the TOML key path, what was wrong and the field's docstring as the fix.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from stepc.compiler.checks import normalize
from stepc.compiler.sft import inherit_model
from stepc.errors import UserError
from stepc.rundir import read_regular_file
from stepc.schema.spec import Spec

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of TOML; a bigger "spec" is the wrong file


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file, refusing what is not one: missing, not a regular file (a FIFO or a
    device would block or never end), over MAX_SPEC_BYTES, or not UTF-8."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError("spec file not found", file=str(path),
                        fix="pass the path of an existing .toml spec, e.g. specs/tiny-cpu.toml")
    data = read_regular_file(path, "spec", "pass the path of a UTF-8 TOML spec file", MAX_SPEC_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"the spec is not UTF-8 text (byte {exc.start}, line {line}: {data[exc.start:exc.start + 1]!r}); "
                        "is it a binary file?", file=str(path), fix="save the spec as UTF-8 TOML") from None


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Read, validate and normalise a spec file; return the spec and the file's text as given."""
    text = read_spec_text(path)
    return parse_spec(text, str(path)), text


_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


def parse_spec(text: str, file: str = "<spec>") -> Spec:
    """Validate TOML text; `file` is only used in messages. A leading UTF-8 byte-order mark is ignored."""
    try:
        raw = tomllib.loads(text.removeprefix("\ufeff"))  # editors on Windows write a BOM; TOML forbids it
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text.removeprefix("\ufeff"), file) from None
    raw = inherit_model(raw, file)  # method "sft": [model] is the init_from run's
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise _to_user_error(exc, raw, file) from None
    return normalize(spec, file)


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, file: str) -> UserError:
    """tomllib's message ("... (at line L, column C)") with the offending line shown under it, and for a
    key defined twice the full key path it names (tomllib says only "Cannot overwrite a value")."""
    message, key = str(exc), None
    at = _AT.search(message)
    if at is None:
        return UserError(f"TOML syntax error: {message}", file=file, fix="correct the TOML syntax")
    lineno, col = int(at.group(1)), int(at.group(2))
    lines = text.splitlines()
    line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    if message.startswith(("Cannot overwrite a value", "Cannot declare")):
        key = _key_on_line(lines, lineno)
        what = f"key {key} is defined twice" if key else "a key or table is defined twice"
        message = f"TOML error: {what} (line {lineno}): {message}"
        fix = "keep one definition of the key (TOML allows each key and table once)"
    else:
        message = f"TOML syntax error: {message}"
        fix = "correct the TOML syntax at that line and column"
    shown = line if len(line) <= 120 else line[:117] + "..."
    caret = " " * (min(col, 120) - 1) + "^"
    return UserError(f"{message}\n    {lineno} | {shown}\n      | {caret}", file=file, key=key, fix=fix)


def _key_on_line(lines: list[str], lineno: int) -> str | None:
    """Dotted key path defined on `lineno` (1-based), prefixed by the table header above it."""
    def bare(part: str) -> str:
        return part.strip().strip("\"'")

    line = lines[lineno - 1].strip()
    header = re.fullmatch(r"\[\[?([^\]]+)\]\]?\s*(#.*)?", line)
    if header:
        return ".".join(bare(p) for p in header.group(1).split("."))
    if "=" not in line:
        return None
    key = ".".join(bare(p) for p in line.split("=", 1)[0].split("."))
    for above in reversed(lines[: lineno - 1]):
        table = re.fullmatch(r"\[\[?([^\]]+)\]\]?\s*(#.*)?", above.strip())
        if table:
            return ".".join(bare(p) for p in table.group(1).split(".")) + "." + key
    return key


def _to_user_error(exc: ValidationError, raw: dict[str, Any], file: str) -> UserError:
    """Describe every problem on its own line, keyed by its TOML path.

    A value that matches no member of a union (e.g. `stages = 0` for `int | "auto"`) yields one pydantic
    error per member, located under member tags such as `memory.stages.constrained-int`; those are merged
    into one line under the key the user wrote.
    """
    errors = exc.errors(include_url=False)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for err in errors:
        grouped.setdefault(_key_path(err["loc"], indices=True)[0], []).append(err)
    lines = [_describe(path, errs) for path, errs in grouped.items()]
    key, fix = _key_and_fix(errors[0])
    message = lines[0].split("] ", 1)[1] if len(lines) == 1 else "invalid spec:\n  - " + "\n  - ".join(lines)
    return UserError(message, file=file, key=key, fix=fix)


def _key_path(loc: tuple[Any, ...], indices: bool = False) -> tuple[str, Any]:
    """(the TOML key path of a pydantic location, the FieldInfo of its last spec field or None).

    Tables and keys are kept, as is the user's own key inside a dict-valued field (data.validation.<name>);
    union-member tags are dropped, list indices too unless `indices` (then shown as `[i]`).
    """
    path, model, field, entry, dict_key_open = "", Spec, None, None, False
    for part in loc:
        if model is not None:  # inside a table: the part is a field name or an unknown key
            path = f"{path}.{part}" if path else str(part)
            field = model.model_fields.get(str(part))
            if field is None:
                break
            annotation = field.annotation
            model = annotation if _is_model(annotation) else None
            dict_key_open = model is None and get_origin(annotation) is dict
            entry = get_args(annotation)[1] if dict_key_open else None
        elif isinstance(part, int):
            if indices:
                path += f"[{part}]"
        elif dict_key_open:
            path, dict_key_open = f"{path}.{part}", False
            if _is_model(entry):  # [data.sources.NAME] is a table of its own: its keys are named, not the table
                model = entry
        # any other string after a leaf field names a union member: not a key the user wrote
    return path or "(top level)", field


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _key_and_fix(err: dict[str, Any]) -> tuple[str, str]:
    key, field = _key_path(err["loc"], indices=True)  # data.train[1]: which list item
    if err["type"] == "extra_forbidden":
        return key, "remove the key or correct its spelling; `stepc help-spec` lists every key"
    doc = field.description if field is not None and field.description else "see `stepc help-spec`"
    return key, f"{_key_path(err['loc'])[0]}: {doc}"


def _describe(key: str, errs: list[dict[str, Any]]) -> str:
    err = errs[0]
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?"
        else:
            hint = f"; known keys here: {', '.join(known)}"
        return f"[{key}] unknown key{hint}"
    if err["type"] == "missing":
        return f"[{key}] is required but missing"
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a table"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    messages = list(dict.fromkeys(e["msg"] for e in errs))
    return f"[{key}] {' or '.join(messages)} (got {shown})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the table at `loc` (a [data.sources.NAME] entry included), or None."""
    model: type[BaseModel] = Spec
    entry = None
    for part in loc:
        if entry is not None:  # the user's own name of a dict entry
            model, entry = entry, None
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) is dict and _is_model(get_args(annotation)[1]):
            entry = get_args(annotation)[1]
            continue
        if not _is_model(annotation):
            return None
        model = annotation
    return None if entry is not None else model
