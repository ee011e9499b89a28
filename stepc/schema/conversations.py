"""Instruction data ([sft] train): jsonl files read line by line into Conversations, every problem a
UserError naming the file and line. Torch-free.

Both sides read the files through this module: `stepc compile` counts the examples (the plan's steps
depend on them) and records each file's sha256; `stepc data prepare` (before torchrun) reads them
again to tokenise, after checking the files are still the ones the manifest recorded.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.hashing import file_sha256_hex
from stepc.schema.templates import Conversation

FORMAT_FIX = {
    "alpaca": 'write one JSON object per line: {"instruction": "...", "input": "..." (may be empty), "output": "..."}',
    "messages": ('write one JSON object per line: {"messages": [{"role": "user", "content": "..."}, '
                 '{"role": "assistant", "content": "..."}]} (user and assistant alternating, the assistant last)'),
}


@dataclass(frozen=True)
class InstructionFile:
    path: str  # as matched from the pattern (relative to the launch directory when the pattern was)
    size: int
    sha256: str
    examples: int


def expand(patterns: list[str]) -> list[tuple[int, Path]]:
    """(pattern index, file) for every file the patterns match, sorted per pattern; a pattern that
    matches nothing, or a file that is not .jsonl, is an error naming sft.train[i]."""
    files: list[tuple[int, Path]] = []
    for i, pattern in enumerate(patterns):
        matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"{pattern!r} matches no file (relative to {Path.cwd()})", key=f"sft.train[{i}]",
                            fix="build the data first (e.g. `python -m stepc.commands.instructions`), or correct the path; "
                                "run stepc from the directory the paths are relative to")
        for path in matched:
            if path.suffix != ".jsonl":
                raise UserError(f"{path} is not a .jsonl file", file=str(path), key=f"sft.train[{i}]",
                                fix="convert it to JSON lines (alpaca_data.json: `jq -c '.[]' alpaca_data.json > alpaca.jsonl`)")
            files.append((i, path))
    return files


def read_examples(path: Path, fmt: str) -> Iterator[tuple[int, Conversation]]:
    """(line number, conversation) of every non-blank line of a jsonl file in format `fmt`."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise UserError(f"cannot read the instruction data: {exc.strerror}", file=str(path), key="sft.train",
                        fix="check the path and its permissions") from None
    with handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise UserError(f"line {lineno} is not UTF-8 text (byte {exc.start} of the line)", file=where,
                                key="sft.train", fix="save the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                array = lineno == 1 and raw.lstrip().startswith(b"[")
                hint = " (the file looks like one JSON array, not JSON lines)" if array else ""
                raise UserError(f"line {lineno} is not JSON: {exc.msg}{hint}", file=where, key="sft.train",
                                fix=FORMAT_FIX[fmt] if not hint else
                                "convert it to JSON lines: `jq -c '.[]' alpaca_data.json > alpaca.jsonl`") from None
            problem, conversation = _parse(record, fmt)
            if problem:
                raise UserError(f"line {lineno}: {problem}", file=where, key="sft.train", fix=FORMAT_FIX[fmt])
            yield lineno, conversation


def _parse(record: Any, fmt: str) -> tuple[str | None, Any]:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object", None
    if fmt == "alpaca":
        return _alpaca(record)
    return _messages(record)


def _alpaca(record: dict[str, Any]) -> tuple[str | None, Any]:
    for field in ("instruction", "output"):
        if field not in record:
            return f"no \"{field}\" field (an Alpaca example has \"instruction\", \"input\" and \"output\")", None
        if not isinstance(record[field], str):
            return f"\"{field}\" is a {type(record[field]).__name__}, not a string", None
    context = record.get("input") or ""
    if not isinstance(context, str):
        return f"\"input\" is a {type(context).__name__}, not a string", None
    if not record["instruction"].strip():
        return "the instruction is empty", None
    if not record["output"].strip():
        return "the output is empty: there is no response to learn", None
    return None, Conversation((record["instruction"],), (record["output"],), context)


def _messages(record: dict[str, Any]) -> tuple[str | None, Any]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no \"messages\" list (a chat example is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]})", None
    system = None
    users: list[str] = []
    answers: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"),
                                                                                                       str):
            return f"messages[{i}] is not {{\"role\": \"...\", \"content\": \"...\"}} with string values", None
        role, content = message["role"], message["content"]
        if role == "system" and i == 0:
            system = content
            continue
        expected = "user" if len(users) == len(answers) else "assistant"
        if role != expected:
            return (f"messages[{i}] has role {role!r}; expected {expected!r} "
                    "(one optional \"system\" first, then user and assistant alternating)"), None
        if not content.strip():
            return f"messages[{i}] ({role}) is empty", None
        (users if role == "user" else answers).append(content)
    if not users or len(answers) != len(users):
        return "the conversation does not end with an assistant message: there is no response to learn", None
    return None, Conversation(tuple(users), tuple(answers), "", system)


def scan(patterns: list[str], fmt: str) -> list[InstructionFile]:
    """Every file of sft.train checked line by line, with its size, sha256 and example count; no
    examples at all is an error."""
    out = []
    for _, path in expand(patterns):
        size = path.stat().st_size
        examples = sum(1 for _ in read_examples(path, fmt))
        out.append(InstructionFile(path.as_posix(), size, file_sha256_hex(path), examples))
    if not any(f.examples for f in out):
        raise UserError("the instruction data holds no examples (every file is empty)", file=out[0].path if out else None,
                        key="sft.train", fix="point sft.train at non-empty jsonl files")
    return out
