"""The experiment spec: every TOML key, its type, its default and its docstring.

Field docstrings are read by pydantic (`use_attribute_docstrings`) and reused verbatim by error
messages, `stepc help-spec` and the README, so they are written for researchers.
Single-field ranges live here; checks that involve several fields live in `stepc/compiler/checks.py`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from stepc.schema.methods import METHODS, Method, MethodName
from stepc.schema.rules import slurm_time_minutes
from stepc.schema.units import parse_bytes

PositiveInt = Annotated[int, Field(gt=0)]
# Upper bounds: what a real model and machine can be, with head room. Beyond them a value is a typo
# (hidden_size = 2**62) that would otherwise compile into an absurd plan or blame the wrong key.
MAX_STEPS = 10**8  # 100M optimizer steps; the longest published pre-training runs are ~1M
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]
StepCount = Annotated[int, Field(ge=0, le=MAX_STEPS)]
NonEmpty = Annotated[str, Field(min_length=1)]


def _one_line(value: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must be one line without control characters (it is written into an #SBATCH line of run.sbatch)")
    return value


OneLine = Annotated[str, AfterValidator(_one_line)]
"""A string that reaches an `#SBATCH` comment line: a newline there would start a shell command."""


class Section(BaseModel):
    """Common config: unknown keys are errors, field docstrings become descriptions, no coercion of types."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, strict=True, frozen=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        """A docstring wrapped over several source lines is one paragraph to its readers (help-spec, errors)."""
        super().__pydantic_init_subclass__(**kwargs)
        for field in cls.model_fields.values():
            if field.description:
                field.description = " ".join(field.description.split())


class Experiment(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=100)
    """Run name: lower-case letters, digits, '.', '_' and '-', starting with a letter or digit; the run directory is
    runs/<name>."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed for model initialisation, data order, adapter initialisation and random layer positions."""
    method: MethodName = "step"
    """Training method: "step" (staged growth + adapters), "vanilla", "relora" or "galore" (the paper's baselines), "growth"
    (staged growth that trains the whole grown model every stage, no adapters: G_stack, MIDAS and LLaMA-Pro as published; pin
    memory.layers), or "sft" (instruction tuning of a finished run's export, Section 4.2: see [sft])."""


class Model(Section):
    hidden_size: int = Field(gt=0, le=65536)  # the largest published dense models use 16-25K
    """Hidden dimension d of the TARGET LLaMA model, at most 65536."""
    num_layers: int = Field(gt=0, le=1024)  # the layout search is O(stages * L) in time and memory
    """Number of decoder layers L of the target model (the last stage's total), at most 1024."""
    num_attention_heads: int = Field(gt=0, le=1024)
    """Attention heads; must divide hidden_size; at most 1024."""
    num_key_value_heads: Annotated[int, Field(gt=0, le=1024)] | None = None
    """Key/value heads for grouped-query attention; must divide num_attention_heads. Default: num_attention_heads."""
    intermediate_size: Annotated[int, Field(gt=0, le=1_048_576)] | None = None
    """MLP width, at most 16 x hidden_size. Default: round(8/3 * hidden_size), the width the paper's Eq. 4 assumes."""
    vocab_size: int = Field(default=50257, gt=0, le=2_097_152)  # token ids are stored as int32; real vocabularies are <= 256K
    """Vocabulary size (50257 = GPT-2, as in the paper), at most 2097152; must cover the tokenizer's vocabulary."""
    seq_len: int = Field(default=1024, ge=16, le=1_048_576)
    """Training sequence length in tokens, 16 to 1048576 (a block of 1 token has no next token to predict)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output head (LLaMA does not)."""
    vocab_multiple_of: int = Field(default=1, gt=0, le=4096)
    """Give the embedding and the head a multiple of this many rows, e.g. 128 (50257 -> 50304): GEMMs with an odd width run
    several times slower on GPUs. The extra rows are never a token. 1 (the default) keeps the paper's parameter counts."""
    intermediate_multiple_of: int = Field(default=1, gt=0, le=4096)
    """Round the MLP width up to a multiple of this, e.g. 128 (round(8/3 d) = 4267 -> 4352 for d = 1600), for the same reason. 1
    (the default) keeps the paper's width."""

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to vocab_multiple_of."""
        return -(-self.vocab_size // self.vocab_multiple_of) * self.vocab_multiple_of

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: kv heads x head dimension (= hidden_size without GQA)."""
        return (self.num_key_value_heads or self.num_attention_heads) * self.head_dim


class Memory(Section):
    budget: int | str | None = None
    """Memory budget per model: an int of bytes or a string with a unit, B KB MB GB TB (powers of 1000) or KiB MiB GiB TiB
    (powers of 1024); the paper's "G" is 1e9; a lower-case "b" (bits) is refused. Binds every method: STEP's layout is solved
    to fit it, and a baseline (fixed layout) over it is an error. Required when stages = "auto"."""
    stages: PositiveInt | Literal["auto"] | None = None
    """Number of stages K (an int >= 1, at most num_layers) or "auto" (the fewest stages whose optimum fits the budget). Default:
    2 for method "step", 1 otherwise."""
    solver: Literal["glpk", "highs"] = "glpk"
    """ILP solver: "glpk" (Pyomo + glpsol, apt package glpk-utils) or "highs" (Pyomo appsi_highs, pip package highspy)."""
    accounting: Literal["paper", "exact", "device"] = "paper"
    """Memory accounting: "paper" (Eq. 1-5 exactly), "exact" (parameter counts of the real model incl. embeddings, GQA and
    optimizer step scalars), "device" (per-GPU peak: exact model states sharded by FSDP plus activations)."""
    layers: list[PositiveInt] | None = None
    """Optional: pin the number of new layers per stage, e.g. [7, 5]; the solver is skipped but the layout is still checked."""

    @field_validator("budget")
    @classmethod
    def _parse_budget(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)


class Step(Section):
    growth_operator: Literal["interpolation-mean", "interpolation-copy", "stack", "stack-middle"] = "interpolation-mean"
    """How new layers are made: "interpolation-mean" (mean of the two neighbours, Appendix A), "interpolation-copy" (copy of the
    lower neighbour), "stack" (G_stack: copies of the top block of the current model, placed on top; n_i = current depth
    stacks the whole model) or "stack-middle" (MIDAS: copies of the middle block, placed right above it). The stacking
    operators place layers themselves: do not set position."""
    position: Literal["upper", "intermediate", "lower", "random", "spread"] = "upper"
    """Where interpolated layers are inserted: "upper" (the paper's best, Table 4), "intermediate", "lower", "random" (seeded) or
    "spread" (evenly, one after each of n_i equal groups: LLaMA-Pro's block expansion with interpolation-copy and fpi = true)."""
    stack_block: PositiveInt | None = None
    """growth_operator = "stack"/"stack-middle" only: copy a block of this many layers, repeated n_i / stack_block times; the
    layout solver then makes every growth a multiple of it (and the first stage at least this deep). Default: the block is
    min(n_i, current depth) layers, no constraint."""
    fpi: bool = False
    """Function-preserving initialisation: zero the output projections of new layers so the grown model computes the same
    function."""
    carry_optimizer_state: bool = False
    """Carry the AdamW moments and step counts of parameters that survive a growth (method "step": embeddings, final norm, head;
    method "growth": also every old layer, matched through its new index) into the next stage instead of restarting them; new
    layers (copies included) and re-initialised adapters start empty, frozen layers hold none. Each stage but the last then
    writes a checkpoint at its final step. Default false: every stage starts a fresh optimizer, as in the paper."""
    grow_at: float = Field(default=0.75, gt=0.0, le=1.0)
    """Fraction (0, 1] of a stage's nominal steps after which the next stage starts (the paper uses 0.75, Table 10)."""
    grow_at_tokens: list[Annotated[int, Field(gt=0, le=MAX_STEPS * 2**32)]] | None = None
    """Alternative to grow_at: the cumulative training-token counts at which each growth happens, one per growth (stages - 1
    entries), strictly increasing, e.g. [2_000_000_000] grows after 2B tokens. Each is rounded down to whole optimizer steps
    of train.global_batch_tokens; a stage's cosine spans max(reference_steps, its steps). The last stage still gets the rest
    of the FLOPs budget, which these must leave room for."""
    lora_rank: int = Field(default=128, gt=0, le=65536)
    """Rank r of the ReLoRA adapters on frozen layers (Table 6: 128)."""
    lora_alpha: float = Field(default=32.0, gt=0.0, le=1e6, allow_inf_nan=False)
    """Adapter scale numerator: the update is (lora_alpha / lora_rank) * B A."""
    relora_reset_every: Steps = 5000
    """Merge adapters into the frozen weights and re-initialise them every this many steps (Table 6: 5000); at most the length of
    every stage with adapters."""
    restart_warmup_steps: StepCount = 500
    """Steps of linear LR re-warm after each adapter merge, the jagged cosine (Table 6: 500); fewer than relora_reset_every."""
    optimizer_reset: Literal["zero", "magnitude"] = "zero"
    """Adapter optimizer state at a merge: "zero" (zeroed in place) or "magnitude" (keep the largest 1 - prune_ratio)."""
    prune_ratio: float = Field(default=0.9, ge=0.0, lt=1.0, allow_inf_nan=False)
    """Fraction of adapter optimizer state pruned by optimizer_reset = "magnitude"."""
    relora_warm_start_steps: StepCount = 1000
    """method = "relora" only: full-rank training steps before LoRA takes over (ReLoRA's warm start)."""
    galore_rank: int = Field(default=128, gt=0, le=65536)
    """method = "galore" only: projection rank (Table 6: 128), at most hidden_size."""
    galore_update_gap: Steps = 200
    """method = "galore" only: steps between projection updates (Table 6: 200)."""
    galore_scale: float = Field(default=0.25, gt=0.0, le=1e3, allow_inf_nan=False)
    """method = "galore" only: scale of the projected update (Table 6: 0.25)."""


class Train(Section):
    reference_steps: Steps = 20000
    """Steps of the vanilla reference run; with global_batch_tokens it fixes the FLOPs budget (Appendix E)."""
    global_batch_tokens: int = Field(default=368640, gt=0, le=2**32)  # real runs use up to ~16M tokens per step
    """Tokens per optimizer step across all ranks, at most 2**32; a multiple of seq_len * micro_batch_size * ranks."""
    micro_batch_size: int = Field(default=5, gt=0, le=65536)  # 5 x 8 ranks x 9 accumulation steps = the paper's 360 sequences
    """Sequences per rank per forward/backward; gradient accumulation makes up the global batch."""
    lr: float = Field(default=5e-4, gt=0.0, le=1.0, allow_inf_nan=False)
    """Peak learning rate (Table 7: 5e-4 for 368M, 4e-4 for 680M, 3e-4 for 1.2B, 1e-2 for GaLore)."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, allow_inf_nan=False)
    """Final learning rate of the cosine as a fraction of lr."""
    warmup_steps: StepCount = 1000
    """Linear warmup steps at the start of every stage (Appendix F: the LR re-warms at each stage); at most the shortest stage."""
    schedule: Literal["cosine"] = "cosine"
    """Learning-rate schedule: linear warmup then cosine decay to min_lr_ratio * lr."""
    betas: list[float] = Field(default=[0.9, 0.95], min_length=2, max_length=2)
    """AdamW betas [beta1, beta2], each in [0, 1)."""
    weight_decay: float = Field(default=0.1, ge=0.0, allow_inf_nan=False)
    """AdamW decoupled weight decay (not applied to norms)."""
    grad_clip: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Compute precision: "bf16" (mixed precision, fp32 master weights, frozen weights stored in bf16) or "fp32"."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each decoder layer (before FSDP sharding): faster steps after a one-off compilation of a minute or two per
    stage; needs a C++ compiler (and Triton on GPUs)."""
    deterministic: bool = False
    """Bit-reproducible kernels (torch.use_deterministic_algorithms, and on GPUs CUBLAS_WORKSPACE_CONFIG and the math attention
    backward instead of flash attention); slower, and an operation without a deterministic kernel stops the run with an error."""
    flops_accounting: Literal["paper", "backprop"] = "paper"
    """FLOPs per token of a frozen parameter: "paper" counts 2 (Appendix E); "backprop" counts 4, because a frozen layer with
    adapters still back-propagates activations."""
    checkpoint_every: Steps = 1000
    """Write a resumable checkpoint every this many steps (and at the end of every stage)."""
    keep_checkpoints: int = Field(default=2, gt=0, le=1000)
    """How many periodic checkpoints to keep per stage."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: list[float]) -> list[float]:
        for beta in value:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"each beta must be in [0, 1), got {beta}")
        return value


class Source(Section):
    files: list[NonEmpty] = Field(min_length=1)
    """Files of this source: parquet, jsonl or txt paths or globs, relative to the directory the stage scripts are
    launched from."""
    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    """Relative share of training samples drawn from this source (normalised over all sources), e.g. 0.7 and 0.3."""
    stage_weights: list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] | None = None
    """Optional: this source's weight in stage 1, 2, ... (a different blend per stage); the last value holds for later stages.
    Default: weight in every stage."""

    def weight_at(self, stage: int) -> float:
        """The weight in stage ``stage`` (1-based)."""
        return self.stage_weights[min(stage, len(self.stage_weights)) - 1] if self.stage_weights else self.weight


class Data(Section):
    train: list[NonEmpty] = Field(default=["data/corpus/train/*.txt"], min_length=1)
    """Training files: at least one parquet, jsonl or txt path or glob, relative to the directory the stage scripts are launched
    from. One source of weight 1; use [data.sources] for a weighted blend instead."""
    sources: dict[str, Source] = {}
    """Weighted training sources (a blend), e.g. [data.sources.web] files = ["data/web/*.parquet"], weight = 0.7. Replaces
    data.train; each source is packed on its own and samples are drawn from the sources in proportion to their weights,
    deterministically from the seed."""
    text_field: str = Field(default="text", min_length=1)
    """Column (parquet) or key (jsonl) that holds the document text."""
    tokenizer: str = Field(default="gpt2", min_length=1)
    """"gpt2" (offline GPT-2 vocabulary), "bpe-<N>" (a byte-level BPE of N tokens trained on the training files, 512 <= N <=
    vocab_size, ASCII digits), or a local Hugging Face tokenizer directory or tokenizer.json (write "./bpe-x" for a directory
    whose name starts with "bpe-")."""
    holdout_fraction: float = Field(default=0.01, ge=0.0, lt=0.5, allow_inf_nan=False)
    """Fraction of training blocks held out as the "heldout" validation set (of every source, for a blend: "heldout-<source>")."""
    validation: dict[str, NonEmpty] = {}
    """Named validation sets, name = path or glob, e.g. fineweb = "data/fineweb-val.parquet"; names are ASCII letters, digits,
    '_' or '-' (not "heldout")."""
    cache_dir: str = ".cache/stepc"
    """Where `stepc data prepare` keeps token shards and tokenizers, shared by every run that uses the same files and tokenizer
    (keyed by file content and tokenizer hash); relative to the directory the stage scripts are launched from."""

    @model_validator(mode="after")
    def _train_or_sources(self) -> Data:
        # Compared with the default, not model_fields_set: a manifest's dumped spec lists every key.
        if self.sources and self.train != Data.model_fields["train"].default:
            raise ValueError("set either data.train (one source) or [data.sources] (a weighted blend), not both")
        return self

    def training_sources(self) -> dict[str, Source]:
        """The blend: [data.sources], or data.train as the single source "train" of weight 1."""
        return dict(self.sources) if self.sources else {"train": Source(files=list(self.train))}

    def weights_at(self, stage: int) -> dict[str, float]:
        """Each training source's weight in stage ``stage`` (1-based)."""
        return {name: source.weight_at(stage) for name, source in self.training_sources().items()}


class Eval(Section):
    every_steps: Steps = 1000
    """Evaluate validation perplexity every this many steps (and at the end of every stage)."""
    max_tokens: int = Field(default=10_000_000, gt=0, le=10**12)
    """At most this many tokens per validation set and evaluation."""


class Sft(Section):
    init_from: NonEmpty
    """The finished run whose exported model is tuned: its run directory, e.g. "runs/paper-1.2b-step2", relative to the directory
    the stage scripts are launched from. Its model (so [model] may be left out; given, it must match), weights and tokenizer
    are the starting point. `stepc compile` records the sha256 of every file of its export; a stage refuses (exit 2) an export
    that is unfinished or changed since."""
    train: list[NonEmpty] = Field(min_length=1)
    """Instruction data: jsonl files or globs, relative to the directory the stage scripts are launched from, one example per
    line in sft.format. `stepc compile` counts the examples (and records each file's sha256): steps = ceil(epochs x examples /
    batch_size)."""
    format: Literal["alpaca", "messages"] = "alpaca"
    """"alpaca": {"instruction": ..., "input": ... (may be empty or absent), "output": ...} per line, as Stanford Alpaca's
    alpaca_data.json; "messages": {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...},
    ...]}, user and assistant alternating and ending with the assistant (multi-turn chats; a first "system" message replaces
    the system text)."""
    template: Literal["alpaca", "vicuna"] = "alpaca"
    """Prompt template around the turns: "alpaca" (Stanford Alpaca's "### Instruction:" / "### Response:" prompt; later turns
    repeat the pair) or "vicuna" (FastChat's vicuna_v1.1, "USER: ... ASSISTANT: ..."). The tokenizer's end-of-text token
    follows every response; `stepc generate` prompts with the same template."""
    system: str | None = None
    """System text at the start of every conversation. Default: the template's own (Alpaca's "Below is an instruction that
    describes a task. ..."); "" for none, e.g. for a small model with a short seq_len."""
    epochs: int = Field(default=2, gt=0, le=1000)
    """Passes over the training examples (Table 8: 2). The last step fills its batch from the next pass's order."""
    batch_size: int = Field(default=128, gt=0, le=2**20)
    """Examples per optimizer step across all ranks (Stanford Alpaca's 128); a multiple of train.micro_batch_size x ranks. Each
    example is one row padded to model.seq_len, so train.global_batch_tokens is resolved to batch_size x seq_len."""


class Slurm(Section):
    partition: OneLine = "gpu"
    """SLURM partition (#SBATCH --partition)."""
    time: str = Field(default="24:00:00", max_length=40)  # checked against SLURM's grammar in stepc/schema/rules.py
    """Wall-clock limit (#SBATCH --time) in one of SLURM's forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds (e.g. "24:00:00", "2-00:00:00"), or "UNLIMITED"."""

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        slurm_time_minutes(value)  # raises ValueError naming SLURM's accepted forms
        return value

    @field_validator("partition")
    @classmethod
    def _partition_not_blank(cls, value: str) -> str:
        if not value.strip() or value.strip() != value:
            raise ValueError("must name a partition, without surrounding blanks (`sinfo -s` lists them)")
        return value
    account: OneLine | None = None
    """SLURM account (#SBATCH --account); omitted when unset."""
    qos: OneLine | None = None
    """Quality of service (#SBATCH --qos); omitted when unset."""
    gpus_per_node: int | None = Field(default=None, ge=0, le=64)
    """GPUs per node (#SBATCH --gpus-per-node). Default: nproc_per_node on GPU clusters; set 0 for CPU-only clusters."""
    cpus_per_task: Annotated[int, Field(gt=0, le=4096)] | None = None
    """CPUs per task (one task per node runs torchrun). Default: leave it to the cluster."""
    extra: list[OneLine] = []
    """Extra #SBATCH lines, e.g. ["--exclusive", "--mem=0"]."""


class Launch(Section):
    nnodes: int = Field(default=1, gt=0, le=65536)
    """Number of nodes."""
    nproc_per_node: int = Field(default=8, gt=0, le=1024)
    """Processes (ranks) per node: one per GPU, or per CPU slot for CPU runs."""
    rdzv_port: int = Field(default=29500, ge=1024, le=65535)
    """First TCP port of the torchrun c10d rendezvous on the head node. Under SLURM the port is rdzv_port + (job id mod
    rdzv_ports), so jobs sharing a head node do not share a rendezvous; a local multi-node launch sets RDZV_ENDPOINT itself."""
    rdzv_ports: int = Field(default=1000, ge=1, le=64512)
    """Size of the rendezvous port range (see rdzv_port): rdzv_ports consecutive job ids get distinct ports. rdzv_port +
    rdzv_ports - 1 must be at most 65535."""
    network_interface: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,15}(,[A-Za-z0-9_.:-]{1,15})*$")
    """Multi-node jobs: the network interface(s) gloo and NCCL use between nodes, e.g. "eth0" or "ib0" (exported as
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME unless already set). Default: the address each node's host name resolves to; a
    loopback one (Debian's 127.0.1.1) is refused before the launch, since the job would hang."""
    sharding: Literal["full", "hybrid"] = "full"
    """How FSDP2 spreads model states: "full" shards them over every rank; "hybrid" (HSDP) shards within each node and replicates
    across nodes, so parameters are all-gathered over a node's own links only and gradients cross nodes once per step
    (all-reduce), at the cost of each GPU holding its node's share rather than the whole job's."""
    collective_timeout: PositiveInt = 1800
    """Seconds a rank waits in a collective (all-reduce, barrier) before the run stops with an error; long enough for rank 0 to
    write an export or a checkpoint while the others wait."""
    slurm: Slurm = Slurm()
    """SLURM settings for run.sbatch."""

    @model_validator(mode="after")
    def _ports_fit(self) -> "Launch":
        if self.rdzv_port + self.rdzv_ports - 1 > 65535:
            raise ValueError(f"rdzv_port + rdzv_ports - 1 = {self.rdzv_port + self.rdzv_ports - 1} is above 65535: "
                             "lower launch.rdzv_port or launch.rdzv_ports")
        return self


class Log(Section):
    every_steps: Steps = 10
    """Write a train record (loss, lr, pre-clip gradient norm, tokens/s, MFU, memory) to metrics.jsonl, the console and the
    trackers every this many steps, and at each stage's last step; each record reads the losses back from the GPU once."""
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers fed beside the always-written metrics.jsonl, any of "tensorboard" (RUN_DIR/tensorboard), "wandb" and
    "mlflow"; each is an optional extra, e.g. pip install 'stepc[wandb]'. One tracked run per run directory: stages and
    resumes continue it."""
    project: OneLine | None = None
    """W&B project and MLflow experiment name. Default: the experiment name."""
    wandb_mode: Literal["auto", "offline", "online"] = "auto"
    """"offline" writes RUN_DIR/wandb only (upload later with `wandb sync`), "online" streams to the W&B server, "auto" is online
    when WANDB_API_KEY is set or `wandb login` stored a key, and offline otherwise."""
    wandb_entity: OneLine | None = None
    """W&B entity (user or team). Default: the logged-in user's default entity."""
    mlflow_tracking_uri: OneLine | None = None
    """MLflow tracking URI, e.g. "http://mlflow:5000" or "sqlite:///mlflow.db". Default: an SQLite store in RUN_DIR/mlflow.db
    (artifacts in RUN_DIR/mlartifacts); each stage prints the `mlflow ui --backend-store-uri ...` command that opens it. A
    directory is a file store (MLflow 3 serves it only with MLFLOW_ALLOW_FILE_STORE=true)."""

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each backend at most once, got {value}")
        return value


class Spec(Section):
    """A whole experiment. Only [experiment] name, [model] and [memory] are required (method "sft": [experiment] and [sft]; its
    [model] is init_from's)."""

    experiment: Experiment
    """Name, seed and method of the experiment."""
    model: Model
    """The target LLaMA model."""
    memory: Memory
    """Memory budget, stage count and the stage-layout solver."""
    step: Step = Step()
    """STEP growth and ReLoRA adapter settings (and the baselines' method settings)."""
    train: Train = Train()
    """Optimisation and the FLOPs budget."""
    data: Data = Data()
    """Training and validation data."""
    eval: Eval = Eval()
    """Validation perplexity schedule."""
    launch: Launch = Launch()
    """torchrun and SLURM launch settings."""
    log: Log = Log()
    """Experiment tracking (TensorBoard, W&B, MLflow) beside metrics.jsonl."""
    sft: Sft | None = Field(default=None, exclude_if=lambda v: v is None)  # absent from other methods' manifests
    """Instruction tuning (method = "sft" only): the run it starts from, the instruction data, the template and the epochs."""

    @property
    def method(self) -> Method:
        """experiment.method's registry entry (stepc.schema.methods): the traits code asks about."""
        return METHODS[self.experiment.method]
