"""One-GPU benchmark of the runtime: a ~350M STEP 2-stage run, the same model vanilla, and a plain
PyTorch loop, side by side; one JSON with tokens/s, MFU, measured CUDA peaks against the `device`
and `exact` predictions per stage, the runtime / plain ratio and the attention kernels that ran.

    python bench/gpu.py --prepare DIR [--smoke]   # compile the run dirs (needs the compiler: pyomo, GLPK)
    python bench/gpu.py --run DIR [--out FILE]    # on the GPU machine: runtime + plain loop only, no network
    python bench/gpu.py --smoke                   # both, tiny model, in a temporary directory (CPU works)

Full size: d 1024, 24 layers, 16 heads (the paper's 368M), GPT-2 vocabulary, seq 1024, bf16,
micro-batch 8, one rank, STEP layers [12, 12]. Every part runs in a subprocess with its own timeout
(at most PART_TIMEOUTS seconds, 8 minutes in all), so one hang or crash costs only its own slot
and is recorded in the JSON as that part's error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"
# seconds per part; the sum is the 8-minute budget
PART_TIMEOUTS = {"step-1": 120, "step-2": 120, "vanilla-1": 120, "plain": 120}

FULL = {"hidden_size": 1024, "num_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 50257, "seq_len": 1024, "layers": [12, 12], "micro_batch_size": 8,
        "reference_steps": 200, "warmup_steps": 20, "tokenizer": "gpt2", "plain_steps": 60, "lora_rank": 128}
SMOKE = {"hidden_size": 64, "num_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 50257, "seq_len": 64, "layers": [2, 2], "micro_batch_size": 2,
         "reference_steps": 12, "warmup_steps": 2, "tokenizer": "gpt2", "plain_steps": 6, "lora_rank": 8}


def spec_text(name: str, method: str, size: dict) -> str:
    layers = f"layers = {size['layers']}\n" if method == "step" else ""
    tokens = size["micro_batch_size"] * size["seq_len"]
    return f"""[experiment]
name = "{name}"
method = "{method}"
seed = 1
[model]
hidden_size = {size['hidden_size']}
num_layers = {size['num_layers']}
num_attention_heads = {size['num_attention_heads']}
num_key_value_heads = {size['num_key_value_heads']}
vocab_size = {size['vocab_size']}
seq_len = {size['seq_len']}
[memory]
accounting = "device"
{layers}[step]
lora_rank = {size['lora_rank']}
[train]
reference_steps = {size['reference_steps']}
global_batch_tokens = {tokens}
micro_batch_size = {size['micro_batch_size']}
warmup_steps = {size['warmup_steps']}
lr = 3e-4
precision = "bf16"
checkpoint_every = 1000000
[data]
train = ["corpus/train/*.txt"]
tokenizer = "{size['tokenizer']}"
holdout_fraction = 0.01
[eval]
every_steps = 1000000
max_tokens = {8 * tokens}
[launch]
nproc_per_node = 1
"""


def prepare(out: Path, smoke: bool) -> None:
    """Compile the STEP and vanilla run dirs under `out` (data paths relative to `out`)."""
    from stepc.cli import main as stepc

    size = SMOKE if smoke else FULL
    out.mkdir(parents=True, exist_ok=True)
    if not (CORPUS / "COMPLETE").exists():
        from stepc.corpus import build_corpus

        build_corpus(CORPUS)
    shutil.rmtree(out / "corpus", ignore_errors=True)
    (out / "corpus" / "train").mkdir(parents=True)
    files = sorted((CORPUS / "train").glob("*.txt"))
    for file in files[:3] if smoke else files:  # smoke: ~0.4 MB, tokenised in seconds
        shutil.copy(file, out / "corpus" / "train" / file.name)
    cwd = os.getcwd()
    os.chdir(out)  # data globs are relative to where the stage scripts will run
    try:
        for method in ("step", "vanilla"):
            spec = out / f"{method}.toml"
            spec.write_text(spec_text(f"gpu-{method}", method, size))
            if stepc(["compile", str(spec), "--out", str(out / "runs"), "--force"]) != 0:
                raise SystemExit(f"cannot compile {spec}")
        # Tokenise once, here (shards in out/.cache/stepc, relative to where the stage scripts run):
        # the GPU machine's time goes to training, and its stage scripts' preparation is a quick check.
        for method in ("step", "vanilla"):
            if stepc(["data", "prepare", str(out / "runs" / f"gpu-{method}"), "--quiet"]) != 0:
                raise SystemExit(f"cannot prepare the data of gpu-{method}")
    finally:
        os.chdir(cwd)
    (out / "bench.json").write_text(json.dumps({"smoke": smoke, "size": size}, indent=1) + "\n")


def _part(cmd: list[str], cwd: Path, timeout: int, env: dict) -> dict:
    """Run one part in a session of its own; on timeout the whole group (torchrun and its workers) is killed."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"ok": False, "timed_out": True, "seconds": timeout, "tail": (stderr or stdout)[-1500:], "stdout": ""}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": round(time.perf_counter() - began, 1),
            **({} if proc.returncode == 0 else {"tail": (stderr or stdout)[-1500:]}), "stdout": stdout[-4000:]}


def _stage_figures(run_dir: Path, index: int) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    plan = manifest["plan"]["stages"][index - 1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    train = [r for r in records if r.get("event") == "train" and r.get("stage") == index]
    steady = train[1:] or train  # the first window includes warm-up (allocator, kernels, compilation)

    def top(key):
        values = [r[key] for r in train if r.get(key) is not None]
        return max(values) if values else None

    peak = top("peak_memory_bytes")
    out = {"layers": plan["total_layers"], "new_layers": plan["new_layers"], "steps_logged": len(train),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
           "mfu": statistics.median(r["mfu"] for r in steady) if steady and steady[0].get("mfu") is not None else None,
           "peak_allocated_bytes": peak, "peak_reserved_bytes": top("peak_reserved_bytes"),
           "alloc_retries": top("alloc_retries"), "predicted_device_bytes": plan["peak_bytes"],
           "predicted_exact_model_state_bytes": plan["exact_model_state_bytes"],
           "final_loss": train[-1]["loss"] if train else None}
    if peak and out["peak_reserved_bytes"] is not None:  # a CUDA measurement (on CPU the peak is the process RSS)
        out["device_prediction_error"] = round(plan["peak_bytes"] / peak - 1, 4)
    return out


def run(bench_dir: Path, out_file: Path | None) -> dict:
    """Runtime-only: stage scripts and the plain loop, each time-boxed; returns (and writes) the JSON."""
    info = json.loads((bench_dir / "bench.json").read_text())
    env = {**os.environ, "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = bench_dir / "runs"
    for name in ("gpu-step", "gpu-vanilla"):  # a rerun measures again instead of finding finished stages
        for stale in ("checkpoints", "metrics.jsonl", "export"):
            target = runs / name / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    result: dict = {"smoke": info["smoke"], "size": info["size"], "parts": {}}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except ImportError:
        pass
    for part, run_dir, stage in (("step-1", runs / "gpu-step", 1), ("step-2", runs / "gpu-step", 2),
                                 ("vanilla-1", runs / "gpu-vanilla", 1)):
        outcome = _part(["bash", str(run_dir / f"stage-{stage}.sh")], bench_dir, PART_TIMEOUTS[part], env)
        outcome.pop("stdout", None)
        outcome.update(_stage_figures(run_dir, stage))
        result["parts"][part] = outcome
    plain = _part([sys.executable, str(Path(__file__).resolve()), "--plain", str(runs / "gpu-vanilla"),
                   "--steps", str(info["size"]["plain_steps"])], bench_dir, PART_TIMEOUTS["plain"], env)
    figures = plain.pop("stdout", "")
    try:
        plain.update(json.loads(figures.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        pass
    result["parts"]["plain"] = plain
    vanilla, base = result["parts"]["vanilla-1"].get("tokens_per_s"), plain.get("tokens_per_s")
    result["runtime_over_plain"] = round(vanilla / base, 4) if vanilla and base else None
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def plain_loop(run_dir: Path, steps: int) -> dict:
    """The loop a researcher would write: HF LlamaForCausalLM on the device, autocast bf16, fused
    AdamW (foreach on CPU), same model size, batch and data as the vanilla run. Prints one JSON line."""
    import torch
    from transformers import LlamaForCausalLM

    from stepc.runtime.data import open_prepared, training_sets
    from stepc.runtime.flops import device_peak_flops, flops_per_token, mfu
    from stepc.runtime.model import StepcLlama, llama_config
    from stepc.schema.manifest import load_manifest

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

    warm = min(5, steps // 2)
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
    per_token = flops_per_token(spec.model, spec.model.num_layers, 0, spec.step.lora_rank)
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
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="compile the benchmark's run dirs into this directory")
    parser.add_argument("--run", type=Path, help="run a prepared directory (runtime only)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (with neither --prepare nor --run: both, in a temp dir)")
    parser.add_argument("--out", type=Path, help="where --run writes the JSON (default: DIR/gpu.json)")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        plain_loop(args.plain, args.steps)
        return 0
    if args.prepare:
        prepare(args.prepare, args.smoke)
        return 0
    if args.run:
        print(json.dumps(run(args.run, args.out or args.run / "gpu.json"), indent=1))
        return 0
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            prepare(Path(tmp), smoke=True)
            print(json.dumps(run(Path(tmp), args.out), indent=1))
        return 0
    parser.error("give --prepare DIR, --run DIR or --smoke")
    return 2


if __name__ == "__main__":
    sys.exit(main())
