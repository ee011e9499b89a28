"""`stepc generate RUN_DIR --questions FILE --out ANSWERS.jsonl`: an instruction-tuned run's answers to
MT-Bench-style questions, in FastChat's answer format, for judging outside stepc (the paper's Section 4.2
judges MT-Bench's 80 two-turn questions with GPT-4).

Questions: FastChat's question.jsonl, one {"question_id": ..., "turns": ["...", ...]} per line (other
keys such as "category" are ignored). Answers: one {"question_id", "answer_id", "model_id",
"choices": [{"index": 0, "turns": [answer per turn]}]} per line, as FastChat's gen_model_answer.py writes
them (without its wall-clock "tstamp", so the file is a function of model, questions and options), read
by its gen_judgment.py.

Every turn is prompted with the run's own template and system text ([sft] template / system) over the
whole conversation so far: turn 2 sees turn 1's question, the model's answer to it and its
end-of-text token, exactly as a two-turn example was laid out in training (stepc.schema.templates,
tokenised piece by piece like stepc.runtime.data.instructions). Greedy decoding by default;
--temperature T samples, seeded per (--seed, question, turn), so a rerun writes the same answers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.atomic import atomic_write_text
from stepc.rundir import manifest_path, RunDir
from stepc.schema.templates import Conversation, render

QUESTIONS_FIX = ('write one JSON object per line: {"question_id": 81, "turns": ["first question", "follow-up"]} '
                 "(FastChat's question.jsonl)")


def read_questions(path: Path) -> list[dict[str, Any]]:
    """The questions of a FastChat question.jsonl; exit 2 naming the file and line of a bad one."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise UserError(f"cannot read the questions: {exc.strerror}", file=str(path), key="--questions",
                        fix="pass a question.jsonl file") from None
    questions, seen = [], set()
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"line {lineno} is not a JSON object", file=where, key="--questions", fix=QUESTIONS_FIX) from None
        problem = _question_problem(record)
        if problem is None and record["question_id"] in seen:
            problem = f"question_id {record['question_id']!r} appears twice"
        if problem:
            raise UserError(f"line {lineno}: {problem}", file=where, key="--questions", fix=QUESTIONS_FIX)
        seen.add(record["question_id"])
        questions.append(record)
    if not questions:
        raise UserError("the question file holds no questions", file=str(path), key="--questions", fix=QUESTIONS_FIX)
    return questions


def _question_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    qid = record.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        return "no \"question_id\" (a number or a string)"
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "\"turns\" is not a non-empty list of non-empty strings"
    return None


def prompt_ids(tok, eos: int, template: str, system: str | None, users: list[str], answers: list[str]) -> list[int]:
    """Token ids that ask for the answer to users[-1], the earlier turns and answers in the template:
    each piece tokenised on its own, end-of-text after every answer, as in training."""
    ids: list[int] = []
    for piece in render(template, Conversation(tuple(users), tuple(answers)), system):
        ids += tok.encode(piece.text, add_special_tokens=False).ids + ([eos] if piece.response else [])
    return ids


def _seed(seed: int, question_id: Any, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{question_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate_answers(run_dir: Path, questions_path: Path, out: Path, max_new_tokens: int = 1024,
                     temperature: float = 0.0, seed: int = 0, model_id: str | None = None,
                     progress=lambda line: print(line, file=sys.stderr, flush=True)) -> list[dict[str, Any]]:
    from stepc.runtime.model.export_seal import ExportDamaged
    from stepc.runtime.model.export_seal import check as check_export
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(run_dir)  # everything the user can get wrong is checked before torch loads
    run_dir = manifest_path(run_dir).parent
    spec = manifest.spec
    if spec.sft is None:
        raise UserError(f"{spec.experiment.name} is a {spec.experiment.method} run: it was not instruction-tuned, so it has "
                        "no prompt template to answer in", file=str(run_dir),
                        fix='generate from a run with method = "sft" (its [sft] template is the prompt format it learned)')
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1", key="--max-new-tokens",
                        fix="e.g. --max-new-tokens 1024")
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: must be 0 (greedy) or more", key="--temperature",
                        fix="e.g. --temperature 0.7")
    if out.is_dir():
        raise UserError(f"{out} is a directory", key="--out", fix="pass the answer file's path, e.g. answers.jsonl")
    export = RunDir(run_dir).export
    try:
        check_export(export)
    except ExportDamaged as exc:
        raise UserError(f"the exported model is missing, unfinished or damaged: {exc}", file=str(export),
                        fix=f"finish training first (stepc run {run_dir})") from None
    questions = read_questions(questions_path)

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from stepc.runtime.data.tokenizer import eos_id
    from stepc.runtime.loop.precision import compute_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=compute_dtype(spec.train.precision, device)).to(device).eval()
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos, seq_len = eos_id(tok), spec.model.seq_len
    model_id = model_id or spec.experiment.name
    records = []
    for q in questions:
        answers: list[str] = []
        for turn in range(len(q["turns"])):
            ids = prompt_ids(tok, eos, spec.sft.template, spec.sft.system, q["turns"][:turn + 1], answers)
            budget = min(max_new_tokens, seq_len - len(ids))
            if budget < 1:  # the conversation fills the context: keep its end, room for half a context of answer
                budget = min(max_new_tokens, seq_len // 2)
                ids = ids[-(seq_len - budget):]
                progress(f"question {q['question_id']} turn {turn + 1}: the conversation is longer than seq_len = {seq_len} "
                         "tokens; its beginning was cut")
            greedy = {"do_sample": False}
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else greedy
            if temperature > 0:
                torch.manual_seed(_seed(seed, q["question_id"], turn))
            prompt = torch.tensor([ids], device=device)
            with torch.no_grad():
                output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=budget,
                                        eos_token_id=eos, pad_token_id=eos, **sampling)
            new = output[0, len(ids):].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            answers.append(tok.decode(new, skip_special_tokens=True).strip())
        digest = hashlib.sha256(json.dumps([model_id, q["question_id"], answers]).encode()).hexdigest()[:22]
        records.append({"question_id": q["question_id"], "answer_id": digest, "model_id": model_id,
                        "choices": [{"index": 0, "turns": answers}]})
        progress(f"answered question {q['question_id']} ({len(records)}/{len(questions)})")
    try:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    except OSError as exc:
        raise UserError(f"cannot write the answers: {exc.strerror}", file=str(out), key="--out",
                        fix="pass a writable path") from None
    return records
