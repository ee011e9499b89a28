"""Cross-field checks and default resolution: the one place where spec fields meet.

`normalize` returns a Spec with every default that depends on other fields filled in
(kv heads, MLP width rounded up to model.intermediate_multiple_of, stage count), so the manifest
records exactly what will run.
"""

from __future__ import annotations

from itertools import pairwise

from stepc.compiler.layout import layout_allowed
from stepc.compiler.static_checks import runtime_facing_problems
from stepc.errors import UserError
from stepc.schema.methods import names_with as _names
from stepc.schema.spec import Spec


SFT_TRAIN_DEFAULTS = {
    # Table 8 (Appendix H): AdamW betas 0.9 / 0.95, lr 1e-4, cosine, 100 warmup steps (epochs: [sft] epochs = 2)
    "lr": 1e-4, "warmup_steps": 100, "betas": [0.9, 0.95], "schedule": "cosine",
    # not in Table 8: Stanford Alpaca's recipe, which the paper's Alpaca tuning follows (HF Trainer's cosine
    # decays to 0; --weight_decay 0)
    "min_lr_ratio": 0.0, "weight_decay": 0.0,
}
"""[train] defaults of method "sft", for each key the spec does not set; the manifest records the result."""


def normalize(spec: Spec, file: str) -> Spec:
    """Fill field-dependent defaults, then check every cross-field rule."""
    for key, problem, fix in _sft_problems(spec):  # before the defaults below hide what the user set
        raise UserError(problem, file=file, key=key, fix=fix)
    if spec.sft is not None:  # method "sft": Table 8's values; the batch is counted in padded examples
        train = {k: v for k, v in SFT_TRAIN_DEFAULTS.items() if k not in spec.train.model_fields_set}
        train["global_batch_tokens"] = spec.sft.batch_size * spec.model.seq_len
        resolved = spec.train.model_copy(update=train)
        # still defaults, not the user's: messages about them say "(the default)" (static_checks._defaults_note)
        object.__setattr__(resolved, "__pydantic_fields_set__", set(spec.train.model_fields_set))
        spec = spec.model_copy(update={"train": resolved})
    model, memory = spec.model, spec.memory
    width = model.intermediate_size or round(8 / 3 * model.hidden_size)
    model = model.model_copy(update={
        "num_key_value_heads": model.num_key_value_heads or model.num_attention_heads,
        "intermediate_size": -(-width // model.intermediate_multiple_of) * model.intermediate_multiple_of,
    })
    default_stages = len(memory.layers) if memory.layers else (2 if spec.method.grows else 1)
    memory = memory.model_copy(update={"stages": memory.stages if memory.stages is not None else default_stages})
    spec = spec.model_copy(update={"model": model, "memory": memory})
    for key, problem, fix in _problems(spec):
        raise UserError(problem, file=file, key=key, fix=fix)
    return spec


def _problems(spec: Spec):
    """Yield (key, problem, fix) for each violated rule, in the order a reader checks a spec."""
    m, mem, exp, tr, st, la = spec.model, spec.memory, spec.experiment, spec.train, spec.step, spec.launch
    if m.hidden_size % m.num_attention_heads:
        yield ("model.num_attention_heads", f"{m.num_attention_heads} heads do not divide hidden_size {m.hidden_size}",
               "choose a head count that divides hidden_size")
    if (m.hidden_size // m.num_attention_heads) % 2:
        yield ("model.num_attention_heads",
               f"head dimension {m.hidden_size // m.num_attention_heads} is odd; rotary embeddings need an even one",
               "choose heads so hidden_size / heads is even")
    if m.num_attention_heads % m.num_key_value_heads:
        yield ("model.num_key_value_heads",
               f"{m.num_key_value_heads} key/value heads do not divide {m.num_attention_heads} attention heads",
               "choose a divisor of num_attention_heads")
    if spec.method.grows and not spec.method.solves_layout and mem.layers is None:
        yield ("memory.layers",
               "method \"growth\" trains the whole model in every stage, so memory cannot choose the layout "
               "(its peak is always the last stage's)",
               "pin the layers per stage, e.g. layers = [4, 4] (the whole-model stack of G_stack)")
    # before the stages rule: stages defaults to len(layers)
    if mem.layers is not None and not spec.method.grows and len(mem.layers) != 1:
        yield ("memory.layers", f"method '{exp.method}' has one stage; layers = {mem.layers}",
               f"remove layers or set layers = [{m.num_layers}]")
    if not spec.method.grows and mem.stages != 1:
        yield ("memory.stages", f"method '{exp.method}' trains in one stage, got stages = {mem.stages!r}",
               "set stages = 1 (or remove it), or use method = \"step\"")
    if mem.stages == "auto" and mem.budget is None:
        yield ("memory.budget", "stages = \"auto\" needs a budget to fit",
               "set budget, e.g. budget = \"3.5GB\", or give stages as an int")
    if isinstance(mem.stages, int) and mem.stages > m.num_layers:
        yield ("memory.stages", f"{mem.stages} stages cannot each add a layer to a {m.num_layers}-layer model",
               f"use at most {m.num_layers} stages")
    if mem.layers is not None:
        if sum(mem.layers) != m.num_layers:
            yield ("memory.layers", f"pinned layers {mem.layers} sum to {sum(mem.layers)}, not model.num_layers = {m.num_layers}",
                   "make the per-stage counts add up to num_layers")
        if mem.stages not in ("auto", len(mem.layers)):
            yield ("memory.stages", f"stages = {mem.stages} but layers pins {len(mem.layers)} stages",
                   "remove stages or make it match len(layers)")
        if mem.stages == "auto":
            yield ("memory.stages", "stages = \"auto\" cannot be combined with pinned layers",
                   "remove one of stages = \"auto\" and layers")
    if spec.data.sources and "train" in spec.data.model_fields_set:  # presence: its value may equal the default
        yield ("data.train", "data.train and [data.sources] are both set: the blend replaces data.train, which would be ignored",
               "remove data.train (or the [data.sources] tables)")
    yield from _growth_problems(spec)
    if st.lora_rank > m.hidden_size and spec.method.adapters:  # no adapters, no rank to check
        yield ("step.lora_rank", f"rank {st.lora_rank} exceeds hidden_size {m.hidden_size}",
               "use a rank below hidden_size (the paper uses 128)")
    ranks = la.nnodes * la.nproc_per_node
    per_micro = m.seq_len * tr.micro_batch_size * ranks
    if tr.global_batch_tokens % per_micro:
        yield "train.global_batch_tokens", (
            f"{tr.global_batch_tokens} tokens is not a multiple of seq_len * micro_batch_size * ranks = "
            f"{m.seq_len} * {tr.micro_batch_size} * {ranks} = {per_micro}"), \
            f"use a multiple of {per_micro}, or change micro_batch_size"
    if spec.method.schedule == "relora" and st.relora_warm_start_steps >= tr.reference_steps:
        yield ("step.relora_warm_start_steps", "the warm start covers the whole run",
               "use fewer warm-start steps than train.reference_steps")
    if not spec.method.shards and la.nnodes * la.nproc_per_node != 1:
        yield ("launch.nproc_per_node", "GaLoreAdamW is not FSDP-aware; stepc runs GaLore on a single rank",
               "set nnodes = 1 and nproc_per_node = 1 for method = \"galore\"")
    if spec.method.objective != "documents":  # [data] is not read: the tokenizer is init_from's
        yield from runtime_facing_problems(spec)
        return
    if m.vocab_size < 256 and spec.data.tokenizer != "gpt2":
        yield ("model.vocab_size", f"vocab_size {m.vocab_size} cannot hold a byte-level tokenizer",
               "use at least 256 (and at least the tokenizer's size)")
    if spec.data.tokenizer == "gpt2" and m.vocab_size < 50257:
        yield ("model.vocab_size", f"the GPT-2 tokenizer has 50257 tokens but vocab_size = {m.vocab_size}",
               "set vocab_size = 50257 or use tokenizer = \"bpe-<N>\" with N <= vocab_size")
    yield from runtime_facing_problems(spec)  # data paths, tokenizer names, validation sets, sizes



STACK_OPERATORS = ("stack", "stack-middle")


def _sft_problems(spec: Spec):
    """[sft] goes with the methods that start from an export, and those read neither [data] nor a FLOPs budget."""
    sft, tr = spec.sft, spec.train
    if spec.method.starts_from != "export":
        if sft is not None:
            yield "sft", (f"[sft] applies to method = {_names(lambda m: m.starts_from == 'export')}, "
                          f"not '{spec.experiment.method}'"), \
                "remove [sft], or set experiment.method = \"sft\""
        return
    if sft is None:
        yield "sft.init_from", (f"method '{spec.experiment.method}' tunes a finished run: "
                                "[sft] init_from and train are required"), \
            'add [sft] with init_from = "runs/<name>" and train = ["data/<instructions>.jsonl"]'
        return
    if "data" in spec.model_fields_set:
        yield "data", ("[data] describes pre-training documents; an SFT run reads sft.train, "
                       "tokenised by init_from's own tokenizer"), \
            "remove [data]"
    if "global_batch_tokens" in tr.model_fields_set:
        yield "train.global_batch_tokens", "an SFT run's batch is counted in examples, each padded to seq_len", \
            "remove it and set sft.batch_size (global_batch_tokens becomes batch_size x seq_len)"
    if "reference_steps" in tr.model_fields_set:
        yield "train.reference_steps", "an SFT run has no FLOPs budget: its length is sft.epochs over its examples", \
            "remove it (set sft.epochs instead)"
    ranks = spec.launch.nnodes * spec.launch.nproc_per_node
    if sft.batch_size % (tr.micro_batch_size * ranks):
        yield "sft.batch_size", (f"{sft.batch_size} examples per step do not split into micro-batches of "
                                 f"train.micro_batch_size x ranks = {tr.micro_batch_size} x {ranks}"), \
            f"use a multiple of {tr.micro_batch_size * ranks}, or change train.micro_batch_size"
    for i, pattern in enumerate(sft.train):
        if pattern.strip() != pattern:
            yield f"sft.train[{i}]", f"{pattern!r} has leading or trailing whitespace", "remove it"
        elif not pattern.rstrip("*?]").endswith(".jsonl") and not pattern.endswith("*"):
            yield (f"sft.train[{i}]", f"{pattern!r} does not name .jsonl files",
                   'write e.g. "data/alpaca.jsonl" or "data/sft/*.jsonl"')


def _growth_problems(spec: Spec):
    """Growth-operator rules: a fixed block must fit every growth. (A key the method or operator ignores,
    such as position under a stacking operator, is a warning: static_checks.no_effect_keys.)"""
    st, mem, L = spec.step, spec.memory, spec.model.num_layers
    stacking = st.growth_operator in STACK_OPERATORS
    yield from _grow_at_tokens_problems(spec)
    if st.stack_block is None or not spec.method.grows or not stacking:
        return
    b = st.stack_block
    if mem.layers is not None and not layout_allowed(mem.layers, b):
        yield ("memory.layers",
               f"pinned layers {mem.layers} do not grow by whole {b}-layer blocks "
               f"(stage 1 needs >= {b} layers, every later stage a multiple of {b})",
               f"pin multiples of {b}, or change step.stack_block")
    elif isinstance(mem.stages, int) and mem.stages > 1 and L < b * mem.stages:
        yield ("step.stack_block",
               f"{mem.stages} stages of whole {b}-layer blocks need at least {b * mem.stages} layers; the model has {L}",
               f"use a block of at most {L // mem.stages} layers, or fewer stages")


def _grow_at_tokens_problems(spec: Spec):
    """grow_at_tokens: instead of grow_at, one strictly increasing count per growth, each a whole step."""
    st, mem, tr = spec.step, spec.memory, spec.train
    tokens = st.grow_at_tokens
    if tokens is None or not spec.method.grows:  # ignored otherwise (a warning)
        return
    if "grow_at" in st.model_fields_set:
        yield "step.grow_at_tokens", "grow_at and grow_at_tokens both set the growth times", "keep one of them"
    growths = len(mem.layers) - 1 if mem.layers is not None else (mem.stages - 1 if isinstance(mem.stages, int) else None)
    if growths is not None and len(tokens) != growths:
        yield ("step.grow_at_tokens", f"{len(tokens)} growth times for {growths} growths ({growths + 1} stages)",
               f"give {growths} token counts, one per growth")
    if any(b <= a for a, b in pairwise(tokens)):
        yield ("step.grow_at_tokens",
               f"{tokens} is not strictly increasing (the counts are cumulative tokens since the start of the run)",
               "list increasing token counts")
    if tokens[0] < tr.global_batch_tokens:
        yield ("step.grow_at_tokens",
               f"{tokens[0]} tokens is less than one optimizer step of train.global_batch_tokens = {tr.global_batch_tokens}",
               f"grow after at least {tr.global_batch_tokens} tokens")
    steps = [t // tr.global_batch_tokens for t in tokens]
    if any(b <= a for a, b in pairwise(steps)):
        yield ("step.grow_at_tokens",
               f"{tokens} rounds down to the optimizer steps {steps} (global_batch_tokens = {tr.global_batch_tokens}): "
               "a stage would train no step", "space the growths at least one global batch apart")
