"""Spec problems that are knowable at compile time but would otherwise surface only when a stage runs.

Each check yields (key, problem, fix), the form `stepc.compiler.checks` raises as a `UserError`:

* `runtime_facing_problems(spec)`: data paths and globs, tokenizer names, validation-set names,
  SLURM fields, sizes no real model has; before the plan is made.
* `plan_problems(spec, plan)`: rules that need the stage lengths (warmups and merge intervals that
  outlast their stage) and the memory budget, which binds every method alike.
* `warnings(spec, plan)`: legal but probably unintended (a validation set that is a training file,
  adapters that are never merged within their stage).

The rules shared with the runtime live in `stepc.schema.rules`, so both sides apply the same one.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator

from stepc.schema.methods import names_with
from stepc.schema.plan import Plan
from stepc.schema.rules import bpe_size, data_suffix_problem, sbatch_extra_problem, validation_name_problem
from stepc.schema.spec import Spec
from stepc.schema.units import format_bytes

Problem = tuple[str, str, str]

MAX_PARAMETERS = 10**14
"""100T parameters: 50x the largest dense model trained so far; beyond it a spec is a typo, not a plan."""


def runtime_facing_problems(spec: Spec) -> Iterator[Problem]:
    m, data = spec.model, spec.data
    per_layer = 4 * m.hidden_size**2 + 3 * m.hidden_size * (m.intermediate_size or 0)
    params = m.num_layers * per_layer + 2 * m.embedding_rows * m.hidden_size
    if params > MAX_PARAMETERS:
        yield ("model.hidden_size", f"hidden_size {m.hidden_size} x num_layers {m.num_layers} (vocab {m.vocab_size}) is a "
               f"{params:.2e}-parameter model, more than any machine trains (limit {MAX_PARAMETERS:.0e})",
               "check model.hidden_size, num_layers, intermediate_size and vocab_size for a typo")
    if m.intermediate_size is not None and m.intermediate_size > 16 * m.hidden_size:
        yield ("model.intermediate_size",
               f"intermediate_size {m.intermediate_size} is more than 16 x hidden_size {m.hidden_size}",
               "LLaMA uses about 8/3 x hidden_size; remove the key for that default")
    if spec.method.optimizer == "galore" and spec.step.galore_rank > m.hidden_size:
        yield ("step.galore_rank", f"rank {spec.step.galore_rank} exceeds hidden_size {m.hidden_size}: a projection cannot "
               "have more dimensions than the matrix it projects", "use a rank at most hidden_size (the paper uses 128)")
    for i, pattern in enumerate(data.train):
        problem = _path_problem(pattern)
        if problem:
            yield (f"data.train[{i}]", problem, "write a parquet, jsonl or txt path or glob, e.g. \"data/train/*.jsonl\"")
    for name, pattern in data.validation.items():
        name_problem = validation_name_problem(name)
        if name_problem:
            yield (f"data.validation.{name}", f"validation set name {name_problem}",
                   "rename it, e.g. milton = \"data/corpus/validation/*.txt\" (quote names with '-' as \"my-set\")")
        problem = _path_problem(pattern)
        if problem:
            yield (f"data.validation.{name}", problem, "write a parquet, jsonl or txt path or glob, e.g. \"data/val.parquet\"")
    for i, line in enumerate(spec.launch.slurm.extra):
        problem = sbatch_extra_problem(line)
        if problem:
            yield (f"launch.slurm.extra[{i}]", problem,
                   "set it through its own key (or leave it to stepc), and keep extra for other sbatch options, e.g. \"--mem=0\"")
    tokenizer = data.tokenizer
    if tokenizer.strip() != tokenizer or not tokenizer.strip():
        yield "data.tokenizer", f"{tokenizer!r} has leading or trailing whitespace", "write e.g. tokenizer = \"bpe-4096\""
    elif tokenizer.lower().replace("-", "") == "gpt2" and tokenizer != "gpt2":
        yield "data.tokenizer", f"unknown tokenizer {tokenizer!r}; did you mean \"gpt2\"?", "write tokenizer = \"gpt2\""
    else:
        try:
            bpe_size(tokenizer, m.vocab_size)
        except ValueError as exc:
            yield "data.tokenizer", str(exc), f"write e.g. tokenizer = \"bpe-{min(4096, m.vocab_size)}\""


def _path_problem(pattern: str) -> str | None:
    if not pattern.strip():
        return "the path is empty or blank"
    if pattern.strip() != pattern:
        return f"{pattern!r} has leading or trailing whitespace"
    return data_suffix_problem(pattern)


def plan_problems(spec: Spec, plan: Plan) -> Iterator[Problem]:
    """Warmups and merge intervals against the stage lengths of the plan, and the budget for every method."""
    tr, st, method = spec.train, spec.step, spec.method
    stages = plan.stages
    default = _defaults_note(spec)
    if method.schedule == "relora":  # one LR schedule over both phases: warmup against the whole run
        runs = [("the whole run", sum(s.steps for s in stages))]
    else:
        runs = [(f"stage {s.index}", s.steps) for s in stages]
    for what, steps in runs:
        if tr.warmup_steps > steps and steps:  # 0: an SFT plan whose data or init_from is not there yet
            yield ("train.warmup_steps", f"warmup_steps = {tr.warmup_steps}{default('train', 'warmup_steps')} is longer than "
                   f"{what} ({steps} steps): the learning rate would never reach its peak",
                   f"use fewer warmup steps than {steps} (a few percent of a stage is usual)")
            break
    merging = [s for s in stages if s.frozen_layers > 0 and s.steps > st.relora_reset_every]
    if merging and st.restart_warmup_steps >= st.relora_reset_every:
        yield ("step.restart_warmup_steps", f"restart_warmup_steps = {st.restart_warmup_steps}"
               f"{default('step', 'restart_warmup_steps')} is not shorter than the merge interval "
               f"relora_reset_every = {st.relora_reset_every}: after each merge in stage {merging[0].index} the learning "
               "rate would never re-warm to its peak", "use fewer re-warm steps than relora_reset_every (Table 6: 500 of 5000)")
    budget = plan.budget_bytes
    if budget is not None and plan.peak_bytes > budget and not method.solves_layout:
        yield ("memory.budget", f"method {method.name!r} has a fixed layout, and its peak of {format_bytes(plan.peak_bytes)} "
               f"({plan.accounting} accounting) is over the budget of {format_bytes(budget)}; the budget binds every method",
               "raise the budget, remove it to compile this baseline as an over-budget reference, or use method = \"step\"")


def _defaults_note(spec: Spec):
    """' (the default)' for a key the spec did not set, so a message about it does not puzzle its author."""
    def note(table: str, key: str) -> str:
        return "" if key in getattr(spec, table).model_fields_set else " (the default)"
    return note


STACKING = ("stack", "stack-middle")
GROWS = names_with(lambda m: m.grows)
ADAPTERS = names_with(lambda m: m.adapters)
# [step] keys that only some methods (or growth operators) read: (applies?, where it applies). Others are ignored.
_APPLIES = {
    "growth_operator": (lambda s: s.method.grows, f"methods {GROWS}"),
    "position": (lambda s: s.method.grows and s.step.growth_operator not in STACKING,
                 f"the interpolation operators of methods {GROWS} (a stacking operator places its block itself)"),
    "stack_block": (lambda s: s.method.grows and s.step.growth_operator in STACKING,
                    f'growth_operator = "stack" or "stack-middle" of methods {GROWS}'),
    "fpi": (lambda s: s.method.grows, f"methods {GROWS}"),
    "grow_at": (lambda s: s.method.grows, f"methods {GROWS}"),
    "grow_at_tokens": (lambda s: s.method.grows, f"methods {GROWS}"),
    "carry_optimizer_state": (lambda s: s.method.grows,
                              f"methods {GROWS} (it carries state into the next stage; this method has one)"),
    **{key: (lambda s: s.method.adapters, f"methods {ADAPTERS} (their ReLoRA adapters)")
       for key in ("lora_rank", "lora_alpha", "relora_reset_every", "restart_warmup_steps", "optimizer_reset")},
    "prune_ratio": (lambda s: s.method.adapters and s.step.optimizer_reset == "magnitude",
                    f'optimizer_reset = "magnitude" of methods {ADAPTERS}'),
    "relora_warm_start_steps": (lambda s: s.method.schedule == "relora",
                                f"methods {names_with(lambda m: m.schedule == 'relora')}"),
    **{key: (lambda s: s.method.optimizer == "galore", f"methods {names_with(lambda m: m.optimizer == 'galore')}")
       for key in ("galore_rank", "galore_update_gap", "galore_scale")},
}


def no_effect_keys(spec: Spec) -> Iterator[tuple[str, str]]:
    """(key, message) for every [step] key given a value other than its default that the chosen method or
    growth operator never reads. A warning, not an error, and only for non-default values: the paper's specs
    share one [step] table across methods on purpose (defaults restated), and a spec is often switched to a
    baseline with --set experiment.method=... without removing its STEP keys."""
    from stepc.schema.spec import Step

    for key, (applies, where) in _APPLIES.items():
        value = getattr(spec.step, key)
        if value != Step.model_fields[key].default and not applies(spec):
            yield (f"step.{key}", f"{key} = {value!r} has no effect here (method \"{spec.experiment.method}\", "
                   f"growth_operator \"{spec.step.growth_operator}\"): it applies to {where}; remove it")


def warnings(spec: Spec, plan: Plan) -> Iterator[tuple[str, str]]:
    """(key, message) for things that compile but are probably mistakes."""
    yield from no_effect_keys(spec)
    st = spec.step
    adapter_stages = [s for s in plan.stages if s.frozen_layers > 0]
    if adapter_stages:
        shortest = min(adapter_stages, key=lambda s: s.steps)
        if st.relora_reset_every >= shortest.steps:  # legal: the stage's export merges them once, at its end
            yield ("step.relora_reset_every", f"relora_reset_every = {st.relora_reset_every}"
                   f"{_defaults_note(spec)('step', 'relora_reset_every')} is not shorter than stage {shortest.index} "
                   f"({shortest.steps} steps): its adapters are merged only at the stage's end, so ReLoRA's restarts "
                   f"do not happen; set it below {shortest.steps} for merges within the stage")
    train = spec.data.train
    for name, pattern in spec.data.validation.items():
        for train_pattern in train:
            if pattern == train_pattern or (not glob.has_magic(pattern) and fnmatch.fnmatchcase(pattern, train_pattern)):
                yield (f"data.validation.{name}", f"{pattern!r} is also matched by data.train {train_pattern!r}: "
                       "its perplexity measures memorisation, not generalisation")
                break
        else:
            shared = _existing(pattern) & set().union(*(_existing(p) for p in train)) if train else set()
            if shared:
                yield (f"data.validation.{name}", f"{sorted(shared)[0]!r} (of {len(shared)} file(s)) is also a training "
                       "file: its perplexity measures memorisation, not generalisation")


def _existing(pattern: str) -> set[str]:
    """Files a pattern matches from the current directory (the usual launch directory), resolved."""
    try:
        return {os.path.realpath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)}
    except (OSError, ValueError):
        return set()
