"""Rules about runtime-facing spec values that the compiler and the runtime must apply identically.

One definition each, imported by both sides, so `stepc compile` never accepts what a stage would
later refuse: the data file types the runtime reads, the `bpe-<N>` tokenizer name and its size
range, validation-set names, and SLURM's `--time` formats. Torch-free and import-light: the
stage preflight and the compiler both load it.

Hand-written because no library states these rules: they are stepc's own (data suffixes, bpe-N)
or SLURM's (its `--time` grammar lives in C, in src/common/parse_time.c).
"""

from __future__ import annotations

import re

DATA_SUFFIXES = (".parquet", ".jsonl", ".txt")
"""File types the runtime reads (data.train and data.validation)."""

BPE_MIN_SIZE = 512
"""Smallest `bpe-<N>`: 256 byte symbols + EOS are fixed, and fewer than ~256 merges make a useless tokenizer."""

_BPE_NAME = re.compile(r"bpe-([0-9]+)")  # [0-9], not \d: \d also matches Arabic-Indic and other Unicode digits
_VALIDATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_VALIDATION_NAMES = ("heldout",)


def bpe_size(name: str, vocab_size: int | None = None) -> int | None:
    """N of a `bpe-<N>` tokenizer name; None when `name` is not of that form at all.

    Raises ValueError (with the accepted range) for a `bpe-...` name that is malformed or out of range:
    N must be written in ASCII digits, at least BPE_MIN_SIZE, and at most `vocab_size` when given.
    """
    if not name.lower().startswith("bpe-") or "/" in name or "\\" in name or name.endswith(".json"):
        return None  # a local tokenizer path, even one whose name starts with "bpe-"
    match = _BPE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"tokenizer {name!r} is not of the form \"bpe-<N>\" with N in ASCII digits, e.g. \"bpe-4096\" "
                         "(the other forms: \"gpt2\", or a path to a tokenizer directory or tokenizer.json)")
    size = int(match.group(1))
    upper = f" and at most model.vocab_size = {vocab_size}" if vocab_size is not None else ""
    if size < BPE_MIN_SIZE or (vocab_size is not None and size > vocab_size):
        raise ValueError(f"tokenizer {name!r}: N must be at least {BPE_MIN_SIZE} (256 bytes + EOS + merges){upper}")
    return size


def validation_name_problem(name: str) -> str | None:
    """Why `name` cannot name a validation set (it becomes a metrics key, ppl_<name>), or None."""
    if name in RESERVED_VALIDATION_NAMES:
        return f"{name!r} is reserved for the held-out split of the training data"
    if not _VALIDATION_NAME.fullmatch(name):
        return f"{name!r} must be 1-64 ASCII letters, digits, '_' or '-', starting with a letter or digit"
    return None


def data_suffix_problem(pattern: str) -> str | None:
    """Why a data path or glob can never match a file the runtime reads, or None when it can.

    Only the last path component is judged, and only when it ends in literal text: "data/*.csv" and
    "data/train" (a directory, or a file without a type) are refused; "data/*" and "data/x.*" are left
    to the runtime, which names any unsupported file it matches.
    """
    last = re.split(r"[/\\]", pattern.rstrip())[-1]
    if not last:
        return "ends in a path separator: it names a directory, not files"
    if last[-1] in "*?]":
        return None
    tail = re.split(r"[*?\[\]]", last)[-1]  # the literal text after the last glob character
    if tail.endswith(DATA_SUFFIXES):
        return None
    suffix = "." + tail.rsplit(".", 1)[1] if "." in tail else None
    what = f"file type {suffix!r}" if suffix else "no file type"
    return f"{pattern!r} has {what}; the runtime reads {', '.join(DATA_SUFFIXES)} files"


_SLURM_TIME = re.compile(
    r"(?:(?P<days>[0-9]+)-(?P<dh>[0-9]+)(?::(?P<dm>[0-9]+)(?::(?P<ds>[0-9]+))?)?"  # D-H, D-H:M, D-H:M:S
    r"|(?P<h>[0-9]+):(?P<m>[0-9]+):(?P<s>[0-9]+)"  # H:M:S
    r"|(?P<mm>[0-9]+)(?::(?P<ms>[0-9]+))?)"  # M, M:S
)
SLURM_TIME_FORMS = ('"minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours", "days-hours:minutes", '
                    '"days-hours:minutes:seconds" (e.g. "90", "24:00:00", "2-00:00:00"), or "UNLIMITED"')


def slurm_time_minutes(value: str) -> float | None:
    """SLURM `--time` in minutes (None for UNLIMITED/INFINITE); ValueError for anything sbatch would refuse."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _SLURM_TIME.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a SLURM time limit; accepted forms: {SLURM_TIME_FORMS}")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    bounded = {"dh": 23, "dm": 59, "ds": 59, "m": 59, "s": 59, "ms": 59}
    for part, top in bounded.items():
        if g.get(part, 0) > top:
            raise ValueError(f"{value!r}: a field is out of range (hours 0-23 after days, minutes and seconds 0-59); "
                             f"accepted forms: {SLURM_TIME_FORMS}")
    if "days" in g:
        return g["days"] * 1440 + g["dh"] * 60 + g.get("dm", 0) + g.get("ds", 0) / 60
    if "h" in g:
        return g["h"] * 60 + g["m"] + g["s"] / 60
    return g["mm"] + g.get("ms", 0) / 60


# sbatch options run.sbatch (and sweep.sbatch) set themselves, or that change what or where the job runs:
# launch.slurm.extra must not restate them (sbatch would take one of two values, or run something else).
SBATCH_OWNED = {
    "--job-name": "experiment.name", "-J": "experiment.name",
    "--nodes": "launch.nnodes", "-N": "launch.nnodes",
    "--ntasks-per-node": "run.sbatch (one task per node)", "--ntasks": "run.sbatch (one task per node)",
    "-n": "run.sbatch (one task per node)",
    "--partition": "launch.slurm.partition", "-p": "launch.slurm.partition",
    "--time": "launch.slurm.time", "-t": "launch.slurm.time",
    "--account": "launch.slurm.account", "-A": "launch.slurm.account",
    "--qos": "launch.slurm.qos", "-q": "launch.slurm.qos",
    "--gpus-per-node": "launch.slurm.gpus_per_node",
    "--cpus-per-task": "launch.slurm.cpus_per_task", "-c": "launch.slurm.cpus_per_task",
    "--requeue": "run.sbatch (it requeues itself)", "--no-requeue": "run.sbatch (it requeues itself)",
    "--signal": "run.sbatch (its time-limit warning)", "--open-mode": "run.sbatch (its log)",
    "--output": "run.sbatch (RUN_DIR/logs)", "-o": "run.sbatch (RUN_DIR/logs)",
    "--array": "stepc sweep (the job array)", "-a": "stepc sweep (the job array)",
    "--wrap": "run.sbatch (the script is the job)",
    "--chdir": "the submit directory (data paths are relative to it)", "-D": "the submit directory (data paths are relative to "
                                                                             "it)",
}


def sbatch_extra_problem(line: str) -> str | None:
    """Why `line` cannot be an extra #SBATCH line (launch.slurm.extra), or None.

    It must be one sbatch option ("--mem=0", "--exclusive", "--constraint=a100"), not a bare word (sbatch
    would stop reading #SBATCH lines or fail), and not one stepc writes itself. Long options are matched as
    sbatch's getopt does: an unambiguous prefix ("--part=gpu") is the option."""
    option = line.strip().split("=", 1)[0].split(None, 1)[0] if line.strip() else ""
    if not option.startswith("-") or option in ("-", "--"):
        return f"{line!r} is not an sbatch option (it must start with '-', e.g. \"--mem=0\")"
    if option in SBATCH_OWNED:
        owned = [option]
    elif option.startswith("--"):
        owned = [] if option in SBATCH_OTHER else [
            name for name in SBATCH_OWNED if name.startswith("--") and len(option) > 3 and name.startswith(option)]
    else:  # a short option, its value perhaps attached (-pgpu, -N2)
        owned = [name for name in SBATCH_OWNED if not name.startswith("--") and option.startswith(name)]
    if owned:
        return f"{line!r} sets {owned[0]}, which stepc controls: {SBATCH_OWNED[owned[0]]}"
    return None


SBATCH_OTHER = ("--gpus",)  # sbatch options of their own that are prefixes of an owned one (--gpus-per-node)
