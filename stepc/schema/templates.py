"""Prompt templates of instruction tuning ([sft] template): a conversation as the text pieces a model
sees, each marked prompt (no loss) or response (loss, followed by the tokenizer's end-of-text token).

One definition for training (stepc/runtime/data/instructions.py tokenises the pieces one by one, so
the prompt/response boundary is exact whatever the tokenizer merges) and for `stepc generate` (which
tokenises a conversation's prompt the same way, so the model is asked exactly as it was taught).
Torch-free.

* "alpaca": Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT);
  a later turn repeats "### Instruction:" / "### Response:" after the previous response.
* "vicuna": FastChat's vicuna_v1.1 template (sep_style ADD_COLON_TWO, sep " ", sep2 = the end-of-text
  token): "SYSTEM USER: q ASSISTANT: a<eos>USER: q2 ASSISTANT:".
"""

from __future__ import annotations

from dataclasses import dataclass

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Conversation:
    """User turns and the assistant's answers; answers[-1] may be missing (a prompt to generate from)."""

    users: tuple[str, ...]
    answers: tuple[str, ...]
    context: str = ""  # Alpaca's "input": context for the first instruction
    system: str | None = None  # a chat's own system message (replaces the template's and [sft] system)


@dataclass(frozen=True)
class Piece:
    text: str
    response: bool  # True: trained on, and followed by the end-of-text token


def render(template: str, conversation: Conversation, system: str | None = None) -> list[Piece]:
    """The pieces of `conversation` under `template`. `system` is [sft] system (None: the template's own).

    With fewer answers than user turns, the last piece is the prompt that asks for the next answer."""
    if len(conversation.answers) not in (len(conversation.users), len(conversation.users) - 1):
        raise ValueError("a conversation has one answer per user turn, or one fewer (a prompt)")
    if conversation.system is not None:
        system = conversation.system
    if template == "alpaca":
        return _alpaca(conversation, system)
    if template == "vicuna":
        return _vicuna(conversation, system)
    raise ValueError(f"unknown template {template!r}")


def _alpaca(c: Conversation, system: str | None) -> list[Piece]:
    if system is None:
        system = ALPACA_SYSTEM_WITH_INPUT if c.context else ALPACA_SYSTEM
    pieces: list[Piece] = []
    for i, user in enumerate(c.users):
        head = (system + "\n\n" if system else "") if i == 0 else "\n\n"
        context = f"### Input:\n{c.context}\n\n" if i == 0 and c.context else ""
        pieces.append(Piece(f"{head}### Instruction:\n{user}\n\n{context}### Response:\n", False))
        if i < len(c.answers):
            pieces.append(Piece(c.answers[i], True))
    return pieces


def _vicuna(c: Conversation, system: str | None) -> list[Piece]:
    if system is None:
        system = VICUNA_SYSTEM
    pieces: list[Piece] = []
    for i, user in enumerate(c.users):
        if i == 0 and c.context:
            user = f"{user}\n\n{c.context}"
        head = (system + " " if system else "") if i == 0 else ""
        pieces.append(Piece(f"{head}USER: {user} ASSISTANT:", False))
        if i < len(c.answers):
            pieces.append(Piece(" " + c.answers[i], True))  # generation continues "ASSISTANT:" with " answer"
    return pieces
