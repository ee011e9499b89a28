"""Instruction tuning (method "sft", the paper's Section 4.2): a finished run's export tuned on
instruction data, loss on response tokens only, resumable bit for bit, answers in FastChat's format.

One tiny pre-training run (a 2-layer d = 64 LLaMA, 80 steps on 2 gloo ranks) is built once per session
and tuned once (`tuned`, 2 ranks, 250 steps on the repeat / reverse / capitals set that
stepc.commands.instructions builds from the corpus); the kill -9 test tunes a second copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import STAGE_TIMEOUT, check_ok, load_weights, run_stage, stage_env, start_stage, write_spec
from test_resume import _kill_when

from stepc.cli import main

SFT_STEPS = 250  # 1000 examples x 2 epochs / 8 per step


def _pretraining_tables(corpus: Path) -> dict:
    return {
        "experiment": {"name": "pre", "seed": 7, "method": "vanilla"},
        "model": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "vocab_size": 512, "seq_len": 128},
        "memory": {"accounting": "exact"},
        "step": {"lora_rank": 4},
        "train": {"reference_steps": 80, "global_batch_tokens": 1024, "micro_batch_size": 4, "lr": 3e-3,
                  "warmup_steps": 8, "precision": "fp32", "checkpoint_every": 40},
        "data": {"train": [str(corpus / "train" / "*.txt")], "tokenizer": "bpe-512", "holdout_fraction": 0.0},
        "eval": {"every_steps": 80, "max_tokens": 4096},
        "launch": {"nproc_per_node": 2},
    }


def sft_tables(pre: Path, data: Path, name: str = "sft", **sft) -> dict:
    return {
        "experiment": {"name": name, "seed": 7, "method": "sft"},
        "sft": {"init_from": str(pre), "train": [str(data)], "system": "", "epochs": 2, "batch_size": 8, **sft},
        "train": {"micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 10, "precision": "fp32", "checkpoint_every": 50},
        "launch": {"nproc_per_node": 2},
    }


def stepc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepc.cli", *args], env=stage_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=2 * STAGE_TIMEOUT)


def compile_sft(root: Path, tables: dict) -> Path:
    spec = write_spec(root / f"{tables['experiment']['name']}.toml", tables)
    check_ok(stepc("compile", str(spec), "--out", str(root / "runs")))
    return root / "runs" / tables["experiment"]["name"]


@pytest.fixture(scope="session")
def instructions(tmp_path_factory, small_corpus) -> Path:
    """The synthetic instruction set built from the session's small corpus."""
    from stepc.commands.instructions import build

    dest = tmp_path_factory.mktemp("instructions")
    build(small_corpus, dest, train=1000, test=100, questions=4)
    return dest


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, small_corpus) -> Path:
    """A finished tiny vanilla run (its export is what SFT tunes)."""
    root = tmp_path_factory.mktemp("pre")
    spec = write_spec(root / "pre.toml", _pretraining_tables(small_corpus))
    check_ok(stepc("compile", str(spec), "--out", str(root / "runs")))
    run_dir = root / "runs" / "pre"
    check_ok(stepc("run", str(run_dir), cwd=run_dir))
    return run_dir


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, pretrained, instructions) -> Path:
    """`pretrained` tuned for SFT_STEPS steps on 2 ranks through `stepc run`. Read-only for the tests."""
    root = tmp_path_factory.mktemp("sft")
    run_dir = compile_sft(root, sft_tables(pretrained, instructions / "train.jsonl"))
    proc = check_ok(stepc("run", str(run_dir), cwd=run_dir))
    (run_dir / "stepc-run.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    return run_dir


# ------------------------------------------------------------------------------ the masked loss

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n{q}\n\n### Input:\n{c}\n\n"
          "### Response:\n")


def test_masked_loss_is_the_cross_entropy_of_the_response_tokens_only(tmp_path):
    """Two examples through the whole path (jsonl -> template -> tokenise -> padded rows -> chunked loss):
    an Alpaca example with an input, and a two-turn chat under the vicuna template. The loss must equal
    the mean cross-entropy over exactly the response tokens and their end-of-text tokens, written out
    here from the literal prompt strings, in float64."""
    from stepc.runtime.data.instructions import Examples, rows, tokenise
    from stepc.runtime.data.tokenizer import build_gpt2_tokenizer
    from stepc.runtime.loop.loss import linear_cross_entropy

    tok = build_gpt2_tokenizer()
    eos = 50256
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Name a colour.", "input": "The sky.", "output": "Blue, mostly."}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Farewell!"}]}) + "\n")
    seq_len = 64

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    # the expected rows, written from the templates' published strings: (ids, is the token a label?)
    expected = [
        [(enc(ALPACA.format(q="Name a colour.", c="The sky.")), False), (enc("Blue, mostly.") + [eos], True)],
        [(enc("Be brief. USER: Hi ASSISTANT:"), False), (enc(" Hello.") + [eos], True),
         (enc("USER: Bye ASSISTANT:"), False), (enc(" Farewell!") + [eos], True)],
    ]
    made = []
    for path, fmt, template in ((alpaca, "alpaca", "alpaca"), (chat, "messages", "vicuna")):
        spec = SimpleNamespace(sft=SimpleNamespace(format=fmt, template=template, system=None),
                               model=SimpleNamespace(seq_len=seq_len))
        tokens, trained, offsets = tokenise(spec, [path], tok)
        made.append((tokens, trained, offsets))
    tokens = np.concatenate([m[0] for m in made])
    trained = np.concatenate([m[1] for m in made])
    offsets = np.concatenate([[0], np.cumsum([m[2][-1] for m in made])])
    examples = Examples(tokens, trained, offsets, tok, {})
    inputs, labels = rows(examples, np.array([0, 1]), seq_len, pad=eos)

    torch.manual_seed(0)
    d = 16
    hidden = torch.randn(2, seq_len, d, dtype=torch.float64)
    weight = torch.randn(tok.get_vocab_size(), d, dtype=torch.float64) * 0.3
    terms = []
    for row, pieces in enumerate(expected):
        ids = [t for piece, _ in pieces for t in piece]
        is_label = [lab for piece, lab in pieces for _ in piece]
        assert inputs[row, :len(ids)].tolist() == ids  # the row is the example, then padding
        assert (inputs[row, len(ids):] == eos).all() and len(ids) <= seq_len
        logits = hidden[row] @ weight.T
        for t in range(1, len(ids)):  # position t - 1 predicts token t
            if is_label[t]:
                terms.append(torch.logsumexp(logits[t - 1], 0) - logits[t - 1, ids[t]])
    expected_loss = torch.stack(terms).mean()
    loss = linear_cross_entropy(hidden, weight, torch.from_numpy(labels), chunk_tokens=40)
    assert len(terms) == sum(len(p) for pieces in expected for p, lab in pieces if lab)
    # the loss sums in fp32 (loss.py); the chunks and the mean are what is checked
    assert torch.allclose(loss.double(), expected_loss, rtol=1e-6, atol=0), (loss.item(), expected_loss.item())


# ----------------------------------------------------------------- tuning, resume, report, answers

def response_accuracy(export: Path, test_file: Path) -> float:
    """Teacher-forced next-token accuracy on the response tokens (and their end-of-text) of held-out
    examples, from the Hugging Face export alone."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from stepc.schema.conversations import read_examples
    from stepc.schema.templates import render

    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    right = total = 0
    for _, conversation in read_examples(test_file, "alpaca"):
        ids, label = [], []
        for piece in render("alpaca", conversation, ""):
            piece_ids = tok.encode(piece.text, add_special_tokens=False).ids + ([eos] if piece.response else [])
            ids += piece_ids
            label += [piece.response] * len(piece_ids)
        with torch.no_grad():
            predicted = model(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        for t in range(1, len(ids)):
            if label[t]:
                total += 1
                right += predicted[t - 1] == ids[t]
    return right / total


def test_tuning_raises_response_token_accuracy_on_held_out_instructions(pretrained, tuned, instructions):
    steps = [m for m in map(json.loads, (tuned / "metrics.jsonl").read_text().splitlines()) if m["event"] == "train"]
    assert steps[-1]["step"] == SFT_STEPS == json.loads((tuned / "manifest.json").read_text())["plan"]["stages"][0]["steps"]
    before = response_accuracy(pretrained / "export", instructions / "test.jsonl")
    after = response_accuracy(tuned / "export", instructions / "test.jsonl")
    print(f"response-token accuracy on held-out examples: untuned {before:.3f}, tuned {after:.3f}")
    assert after > before + 0.08 and after > 2 * before, (before, after)


def test_kill9_resume_is_bit_identical(tuned, pretrained, instructions, tmp_path, monkeypatch):
    """The same SFT spec, killed with SIGKILL while both ranks are held after step 100 (checkpointed),
    then rerun: its export equals the uninterrupted run's bit for bit."""
    run_b = compile_sft(tmp_path, sft_tables(pretrained, instructions / "train.jsonl"))
    held = tmp_path / "held"
    monkeypatch.setenv("STEPC_FAULT_HOLD_AFTER_STEP", "1:100")
    monkeypatch.setenv("STEPC_FAULT_HOLD_FILE", str(held))
    proc = start_stage(run_b, 1, tmp_path / "killed.log")
    monkeypatch.delenv("STEPC_FAULT_HOLD_AFTER_STEP")
    _kill_when(proc, lambda: all(held.with_name(f"held.rank{r}").is_file() for r in range(2)), "both ranks held after step 100")
    assert not (run_b / "export").exists()
    resumed = check_ok(run_stage(run_b, 1))
    assert f"resumed stage 1 from {run_b / 'checkpoints' / 'stage-1' / 'step-00000100'} at step 100" in resumed.stdout
    a, b = load_weights(tuned / "export"), load_weights(run_b / "export")
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def test_report_puts_the_pretraining_run_beside_its_sft_run(tuned, pretrained, tmp_path):
    from stepc.commands.report import write_report

    table = write_report([tuned], tmp_path / "report")  # only the SFT run given: its init_from joins it
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| pre ") or line.startswith("| sft ")]
    assert [r[0] for r in rows] == ["| pre", "| sft"], table
    head = table.splitlines()[0].split(" | ")
    column = head.index("tuned from")
    assert rows[1][column] == "pre" and rows[0][column] == "-" and rows[1][head.index("method")] == "sft", table
    assert rows[1][head.index("steps")] == f"{SFT_STEPS:,}" and rows[0][head.index("steps")] == "80", table


def test_generate_writes_fastchat_answers_keeping_the_conversation(tuned, instructions, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from stepc.commands.generate import generate_answers, prompt_ids

    # short turns, so that two of them, an answer and the next answer fit in the model's 128 tokens
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "writing", "turns": ["Repeat this line: Come hither.", "Reverse the words: Good night."]},
        {"question_id": "q2", "turns": ["Write in capital letters: All is well.", "Repeat this line: Away!"]},
        {"question_id": 3, "turns": ["Reverse the words: I am here.", "Write in capital letters: Go."]}]))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(tuned), "--questions", str(questions), "--out", str(out), "--max-new-tokens", "12"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    asked = [json.loads(line) for line in questions.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in asked]
    for record, question in zip(records, asked):
        assert record["model_id"] == "sft" and isinstance(record["answer_id"], str)
        assert len(record["choices"]) == 1 and record["choices"][0]["index"] == 0
        assert len(record["choices"][0]["turns"]) == len(question["turns"]) == 2
        assert all(isinstance(turn, str) for turn in record["choices"][0]["turns"])
    # turn 2 is answered with turn 1 and its answer in the prompt: an independent greedy decode agrees
    export = tuned / "export"
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    first = prompt_ids(tok, eos, "alpaca", "", asked[0]["turns"][:1], [])
    answer_1 = records[0]["choices"][0]["turns"][0]
    second = prompt_ids(tok, eos, "alpaca", "", asked[0]["turns"], [answer_1])
    assert second[:len(first)] == first and eos in second[len(first):]
    for record, question in zip(records, asked):
        ids = prompt_ids(tok, eos, "alpaca", "", question["turns"], record["choices"][0]["turns"][:1])
        assert len(ids) + 12 <= 128  # fits: nothing was cut from the conversation
        prompt = torch.tensor([ids])
        new = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        new = new[:new.index(eos)] if eos in new else new
        assert tok.decode(new, skip_special_tokens=True).strip() == record["choices"][0]["turns"][1]
    # greedy is the default and deterministic; sampling is seeded
    again = tmp_path / "again.jsonl"
    generate_answers(tuned, questions, again, 12)
    assert again.read_bytes() == out.read_bytes()
    sampled = [tmp_path / f"s{i}.jsonl" for i in range(3)]
    for path, seed in zip(sampled, (1, 1, 2)):
        generate_answers(tuned, questions, path, 12, temperature=1.0, seed=seed)
    assert sampled[0].read_bytes() == sampled[1].read_bytes() != sampled[2].read_bytes()
    assert sampled[0].read_bytes() != out.read_bytes()


# ------------------------------------------------------------------- bad input, before torchrun

def _refused(proc: subprocess.CompletedProcess, *needles: str, fix_line: bool = True) -> None:
    """Exit 2, no traceback, each needle in the output; a UserError's "fix:" line (a stage preflight's
    refusal says what to do in its one sentence instead: give that as a needle)."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert ("fix:" in text or not fix_line) and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


def test_bad_instruction_data_and_init_from_exit_2_before_torchrun(pretrained, instructions, tmp_path):
    good = (instructions / "train.jsonl").read_text().splitlines()
    spec_of = lambda name, data, **kw: write_spec(tmp_path / f"{name}.toml", sft_tables(pretrained, data, name,
                                                                                        **kw))  # noqa: E731

    # a missing field: stepc compile names the file and line
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(good[:2] + [json.dumps({"instruction": "Repeat this line: x", "input": ""})] + good[3:8]) + "\n")
    _refused(stepc("compile", str(spec_of("missing", missing)), "--out", str(tmp_path / "runs")),
             f"{missing}:3", 'no "output" field')

    # an empty dataset
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _refused(stepc("compile", str(spec_of("empty", empty)), "--out", str(tmp_path / "runs")), str(empty), "no examples")

    # an init_from that is not a finished run: compiled, never trained
    unfinished = tmp_path / "runs" / "pre-copy"
    unfinished.mkdir(parents=True)
    shutil.copy(pretrained / "manifest.json", unfinished / "manifest.json")
    spec = write_spec(tmp_path / "unfinished.toml", sft_tables(unfinished, instructions / "train.jsonl", "unfinished"))
    _refused(stepc("compile", str(spec), "--out", str(tmp_path / "runs")), "[sft.init_from]", "has not finished",
             f"stepc run {unfinished}")

    # a response longer than seq_len: refused by the stage script's data preparation, before torchrun
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join([good[0], json.dumps({"instruction": "Repeat this line: x", "input": "",
                                                    "output": "and " * 200})] + good[2:200]) + "\n")
    run_dir = compile_sft(tmp_path, sft_tables(pretrained, long, "long"))
    _refused(run_stage(run_dir, 1), f"{long}:2", "longer than model.seq_len = 128")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()

    # data edited after compilation (the plan counted its examples): the preparation refuses it
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(good[:200]) + "\n")
    run_dir = compile_sft(tmp_path, sft_tables(pretrained, edited, "edited"))
    with edited.open("a") as handle:
        handle.write(good[200] + "\n")
    _refused(stepc("data", "prepare", str(run_dir)), str(edited), "changed since `stepc compile` counted its examples",
             "stepc compile SPEC --force")

    # init_from's export changed (or went missing) after compilation: the stage's preflight refuses it
    source = tmp_path / "runs" / "pre-moved"
    shutil.copytree(pretrained, source, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    run_dir = compile_sft(tmp_path, sft_tables(source, instructions / "train.jsonl", "drift"))
    config = source / "export" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    from stepc.runtime.model.export_seal import seal

    seal(source / "export")  # as a re-export would: a consistent seal over other files
    _refused(run_stage(run_dir, 1), "export changed since this run was compiled", "config.json",
             "Restore the original export, or recompile this spec (`stepc compile SPEC --force`)", fix_line=False)
    shutil.rmtree(source / "export")
    _refused(run_stage(run_dir, 1), f"init_from {source}: its export {source / 'export'} is missing or unfinished",
             f"finish that run (`stepc run {source}`)", fix_line=False)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints" / "stage-1").exists()


# ------------------------------------------------------------------ the spec: plan, defaults, paper

def test_table_8_values_are_the_defaults_and_the_paper_spec_reproduces_them():
    from stepc.compiler.load import parse_spec

    root = Path(__file__).resolve().parents[1]
    paper = parse_spec((root / "specs" / "paper-1.2b-sft.toml").read_text(), "paper-1.2b-sft.toml")
    tr = paper.train
    assert (paper.experiment.method, paper.sft.epochs, tr.lr, tr.warmup_steps, tr.betas, tr.schedule) == \
        ("sft", 2, 1e-4, 100, [0.9, 0.95], "cosine")
    assert (paper.model.hidden_size, paper.model.num_layers, paper.sft.init_from) == (2048, 24, "runs/paper-1.2b-step2")
    bare = parse_spec(
        '[experiment]\nname = "bare"\nmethod = "sft"\n[model]\nhidden_size = 256\nnum_layers = 2\nnum_attention_heads = 4\n'
        '[sft]\ninit_from = "runs/nowhere"\ntrain = ["x.jsonl"]\nbatch_size = 20\n[launch]\nnproc_per_node = 2\n', "bare.toml")
    tr = bare.train  # nothing of [train] given: Table 8's values, resolved into the manifest's spec
    assert (bare.sft.epochs, tr.lr, tr.warmup_steps, tr.betas, tr.schedule) == (2, 1e-4, 100, [0.9, 0.95], "cosine")
    assert tr.global_batch_tokens == 20 * 1024  # batch_size examples of seq_len tokens


def test_plan_shows_what_it_can_before_init_from_exists_and_compile_refuses(tmp_path):
    root = Path(__file__).resolve().parents[1]
    spec = root / "specs" / "paper-1.2b-sft.toml"
    plan = stepc("plan", str(spec), cwd=tmp_path)  # no runs/paper-1.2b-step2 and no data here
    assert plan.returncode == 0, plan.stderr
    assert "steps unknown" in plan.stdout and "runs/paper-1.2b-step2" in plan.stdout and "1208.06M" in plan.stdout
    _refused(stepc("compile", str(spec), "--out", str(tmp_path / "runs"), cwd=tmp_path), "[sft.init_from]",
             "runs/paper-1.2b-step2")
