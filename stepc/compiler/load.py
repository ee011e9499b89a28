"""Parse a TOML spec into a validated, normalised `Spec`, turning every problem into a `UserError`.

Errors name the file, the TOML key path, what was wrong and the field's docstring as the fix.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError

from stepc.compiler.checks import normalize
from stepc.errors import UserError
from stepc.schema.spec import Spec


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Read, validate and normalise a spec file; return the spec and the file's text as given."""
    text = read_spec_text(path)
    return parse_spec(text, str(path)), text


def read_spec_text(path: str | Path) -> str:
    """The spec file's text; a UserError naming the file when it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("spec file not found", file=str(path), fix="pass the path of an existing .toml spec, e.g. specs/tiny-cpu.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the spec: {exc}", file=str(path), fix="pass a readable UTF-8 TOML file") from None


def parse_spec(text: str, file: str = "<spec>") -> Spec:
    """Validate TOML text; `file` is only used in messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line L, column C)".
        raise UserError(f"TOML syntax error: {exc}", file=file, fix="correct the TOML syntax at that line and column") from None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise _to_user_error(exc, raw, file) from None
    return normalize(spec, file)


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
    path, model, field, dict_key_open = "", Spec, None, False
    for part in loc:
        if model is not None:  # inside a table: the part is a field name or an unknown key
            path = f"{path}.{part}" if path else str(part)
            field = model.model_fields.get(str(part))
            if field is None:
                break
            annotation = field.annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            dict_key_open = model is None and get_origin(annotation) is dict
        elif isinstance(part, int):
            if indices:
                path += f"[{part}]"
        elif dict_key_open:
            path, dict_key_open = f"{path}.{part}", False
        # any other string after a leaf field names a union member: not a key the user wrote
    return path or "(top level)", field


def _key_and_fix(err: dict[str, Any]) -> tuple[str, str]:
    key, field = _key_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return key, "remove the key or correct its spelling; `stepc help-spec` lists every key"
    doc = field.description if field is not None and field.description else "see `stepc help-spec`"
    return key, f"{key}: {doc}"


def _describe(key: str, errs: list[dict[str, Any]]) -> str:
    err = errs[0]
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else f"; known keys here: {', '.join(known)}"
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
    """The pydantic model class that owns the table at `loc`, or None for dicts/lists."""
    model: type[BaseModel] = Spec
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
