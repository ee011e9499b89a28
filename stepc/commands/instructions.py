"""Build the bundled synthetic instruction set from the demo corpus (for specs/tiny-cpu-sft.toml and the tests).

Three tasks on short corpus lines, each checkable token by token: repeat the line, reverse the order
of its words, write it in capital letters. The line is part of the instruction, so training examples
and MT-Bench-style questions prompt the same way. Deterministic (a fixed seeded shuffle of the
corpus's lines), so two builds from the same corpus are byte-identical.

Layout written under DEST (default data/instructions)::

    train.jsonl       Alpaca format ({"instruction", "input", "output"}): what [sft] train reads
    test.jsonl        the same tasks on lines train.jsonl never uses (held out: response-token accuracy)
    questions.jsonl   FastChat MT-Bench question format ({"question_id", "category", "turns"}), two
                      turns each (two tasks on two more unseen lines): `stepc generate --questions`

Usage: ``python -m stepc.commands.instructions [DEST] [--corpus DIR] [--train N] [--test N] [--questions N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from stepc.atomic import atomic_write_text

DEFAULT_DEST = Path("data/instructions")
DEFAULT_CORPUS = Path("data/corpus")
TASKS = {
    "repeat": ("Repeat this line: ", lambda line: line),
    "reverse": ("Reverse the words: ", lambda line: " ".join(reversed(line.split()))),
    "capitals": ("Write in capital letters: ", str.upper),
}
_WORD = re.compile(r"[A-Za-z][a-z']*[,;.!?]?")


def candidate_lines(corpus: Path) -> list[str]:
    """Distinct corpus lines of 3-6 plain words, at most 40 characters, not already in capitals, in a
    fixed seeded order."""
    seen: dict[str, None] = {}
    for path in sorted((corpus / "train").glob("*.txt")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = " ".join(raw.split())
            words = line.split()
            if 3 <= len(words) <= 6 and len(line) <= 40 and line != line.upper() and all(_WORD.fullmatch(w) for w in words):
                seen.setdefault(line, None)
    lines = sorted(seen)
    random.Random(0).shuffle(lines)
    return lines


def build(corpus: Path, dest: Path, train: int = 2000, test: int = 200, questions: int = 20) -> dict[str, int]:
    """Write the three files (each only when its content changed, atomically); return their record counts."""
    lines = candidate_lines(corpus)
    need = train + test + 2 * questions
    if len(lines) < need:
        raise ValueError(f"{corpus} has {len(lines)} usable lines; {need} are needed (is the corpus built? "
                         "`python -m stepc.commands.corpus`)")
    names = list(TASKS)

    def example(i: int, line: str) -> dict[str, str]:
        prefix, answer = TASKS[names[i % len(names)]]
        return {"instruction": prefix + line, "input": "", "output": answer(line)}

    files = {
        "train.jsonl": [example(i, line) for i, line in enumerate(lines[:train])],
        "test.jsonl": [example(i, line) for i, line in enumerate(lines[train:train + test])],
        "questions.jsonl": [
            {"question_id": q + 1, "category": names[q % len(names)],
             "turns": [TASKS[names[q % len(names)]][0] + lines[train + test + 2 * q],
                       TASKS[names[(q + 1) % len(names)]][0] + lines[train + test + 2 * q + 1]]}
            for q in range(questions)],
    }
    for name, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path = dest / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged files keep their mtime
            atomic_write_text(path, text)
    return {name: len(records) for name, records in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepc.commands.instructions",
                                     description="Build the synthetic instruction set from the demo corpus.")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST, help="output directory (default: data/instructions)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="the demo corpus (default: data/corpus)")
    parser.add_argument("--train", type=int, default=2000, help="training examples (default 2000)")
    parser.add_argument("--test", type=int, default=200, help="held-out examples (default 200)")
    parser.add_argument("--questions", type=int, default=20, help="two-turn questions (default 20)")
    args = parser.parse_args(argv)
    try:
        counts = build(args.corpus, args.dest, args.train, args.test, args.questions)
    except (OSError, ValueError) as exc:
        print(f"stepc.commands.instructions: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest}: " + ", ".join(f"{name} ({n})" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
