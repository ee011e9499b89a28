"""The paper's real shapes end to end on 2 CPU ranks (issue 20): memory, growth, checkpoints, export,
resume and speed of `specs/paper-368m-step2.toml` (and 680M when it fits), and the 1.2B model built on
meta, sharded and filled.

Each spec is compiled with `stepc compile --set ...` (2 ranks, micro batch 1, seq 1024, a few steps
per stage, a ReLoRA merge, a checkpoint every 2 steps, a short eval) in a temporary directory holding
a synthetic parquet corpus at the spec's own data paths (bench/data.py's builder), and its emitted
stage scripts run as a user would run them, under `nice -n 10`. While a stage runs, each rank's
resident memory is followed from /proc: the kernel's high-water mark (VmHWM, reset through
clear_refs at each phase: build/growth, training, final eval + export), so no short peak is missed.
Reported per stage:

- model-state bytes measured by the runtime (parameters + gradients + AdamW state over the ranks)
  against the compiler's `exact` prediction, byte for byte;
- peak RSS per rank in training against a CPU form of the `device` accounting: the same terms with
  fp32 compute (CPU ranks compute in fp32; frozen weights stay bf16) plus the measured RSS of a
  process that has imported the runtime (Python, torch, transformers: what a CUDA estimate has no
  term for); goal within 15%;
- peak RSS while growing (model build on meta + fill, stage 2) over the training peak; goal <= 1.1;
- DCP checkpoint size, write seconds (the runtime's record) and read seconds (the resume record);
- the export's size and the seconds `AutoModelForCausalLM.from_pretrained` takes to load it;
- CPU MFU: the runtime's FLOPs-per-token formula x tokens/s over the machine's peak, measured by
  fp32 matmuls of the layer's shapes with one thread in each of 2 concurrent processes (what the 2
  ranks run with); goal >= 0.6;
- the runtime against a plain single-process PyTorch loop (HF LlamaForCausalLM, AdamW, same batch,
  data and threads) on the 368M stage 1, medians over steps; goal >= 0.95;
- kill -9 of 368M stage 2 right after its first checkpoint, rerun: the export's safetensors must be
  bit-identical (sha256) to the uninterrupted run's.

The 1.2B part builds stage 1 of `specs/paper-1.2b-step2.toml` on meta, shards it over 2 ranks and
fills it, writes its export, then grows stage 2 (all 24 layers) from that export the same way; peak
RSS per rank over what the rank's shard is predicted to hold (goal <= 1.1). Training 1.2B does not
fit this machine and is not attempted. A part whose predicted peak over both ranks exceeds
--memory-limit is skipped with that reason in the table and the JSON.

    nice -n 10 python bench/scale.py                  # all parts (~40 min on 2 cores)
    nice -n 10 python bench/scale.py --only 368m      # one part (~15 min); --steps N: reference steps
    python bench/scale.py --smoke                     # tiny shapes, every code path, ~3 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data import build_corpus, paragraphs  # noqa: E402

PARTS = ("368m", "680m", "1.2b-meta")
SPECS = {"368m": "paper-368m-step2.toml", "680m": "paper-680m-step2.toml", "1.2b-meta": "paper-1.2b-step2.toml"}
RANKS = 2
MEMORY_LIMIT = 20e9  # both ranks together: what this shared 23 GB machine can give a run
GOALS = {"rss_ratio": 0.15, "growth_over_training": 1.1, "mfu": 0.6, "runtime_over_plain": 0.95, "meta_fill": 1.1}
# Smoke: tiny shapes through every code path (same specs, same overrides on top).
SMOKE_MODEL = {"368m": ("64", "4", "4"), "680m": ("64", "6", "4"), "1.2b-meta": ("96", "6", "4")}


def overrides(part: str, steps: int, smoke: bool) -> list[str]:
    """The --set list: 2 CPU ranks, micro batch 1, a few steps, a merge and a checkpoint every 2 steps."""
    seq = 128 if smoke else 1024
    sets = [f"launch.nproc_per_node={RANKS}", "train.micro_batch_size=1", f"train.global_batch_tokens={RANKS * seq}",
            f"train.reference_steps={steps}", "train.warmup_steps=1", "step.relora_reset_every=2",
            "step.restart_warmup_steps=1", "train.checkpoint_every=2", f"eval.max_tokens={RANKS * seq}", "log.every_steps=1"]
    if smoke:
        d, layers, heads = SMOKE_MODEL[part]
        sets += [f"model.hidden_size={d}", f"model.num_layers={layers}", f"model.num_attention_heads={heads}",
                 f"model.seq_len={seq}", "step.lora_rank=8", 'memory.budget="1GB"']
    return sets


# ------------------------------------------------------------------------------------------ the data

def write_data(work: Path, text_bytes: int) -> None:
    """The spec's own data paths under `work`: data/fineweb-edu/*.parquet, data/fineweb-val.parquet and
    data/wikitext-103-test.txt (bench/data.py's shuffled-paragraph documents)."""
    build_corpus(work / "data" / "fineweb-edu", text_bytes, seed=0)
    build_corpus(work / "val-tmp", max(text_bytes // 20, 50_000), seed=1)
    shutil.move(next((work / "val-tmp").glob("*.parquet")), work / "data" / "fineweb-val.parquet")
    shutil.rmtree(work / "val-tmp")
    paras = paragraphs()
    (work / "data" / "wikitext-103-test.txt").write_text("\n\n".join(paras[-400:]) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------- watching the ranks

def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon of a process in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (proc(5))
    except OSError:
        pass


def _ranks(root: psutil.Process) -> dict[int, int]:
    """rank -> pid of torchrun's workers under `root`."""
    out = {}
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and "torchrun" not in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child.pid
    return out


def _cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1  # only whole lines
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def run_stage(run_dir: Path, index: int, work: Path, env: dict, log: Path, kill_after_checkpoint: bool = False,
              limit: float = 3600) -> dict:
    """Run stage-<index>.sh from `work`, following each rank's memory by phase; optionally kill -9 the
    whole launch as soon as the stage's first checkpoint record is written."""
    from stepc.schema.manifest import load_manifest

    steps = load_manifest(run_dir).plan.stages[index - 1].steps
    metrics = run_dir / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.exists() else 0
    records: list[dict] = []
    phase, peaks, rss = "build", {}, {}  # phase -> rank -> VmHWM; rank -> (max VmRSS, max RssAnon) sampled
    began = time.perf_counter()
    killed = False
    with open(log, "a") as handle:
        killing = " (killed after its first checkpoint)" if kill_after_checkpoint else ""
        handle.write(f"\n===== stage {index} of {run_dir.name}{killing}\n")
        handle.flush()
        proc = subprocess.Popen(["nice", "-n", "10", "bash", str(run_dir / f"stage-{index}.sh")], cwd=work, env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        root = psutil.Process(proc.pid)
        ranks: dict[int, int] = {}
        while proc.poll() is None:
            if time.perf_counter() - began > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise SystemExit(f"stage {index} of {run_dir.name} ran past {limit:.0f} s; see {log}")
            ranks = ranks if len(ranks) == RANKS else _ranks(root)
            for rank, pid in ranks.items():
                s = _status(pid)
                if s:
                    peaks.setdefault(phase, {})[rank] = max(peaks.get(phase, {}).get(rank, 0), s["VmHWM"])
                    old = rss.get(rank, (0, 0))
                    rss[rank] = (max(old[0], s["VmRSS"]), max(old[1], s["RssAnon"]))
            fresh, offset = _new_records(metrics, offset)
            if fresh:  # the ranks' CPU seconds when each record appeared: per-step CPU cost, robust to other load
                cpu = _cpu_seconds(ranks.values())
                for record in fresh:
                    record["_cpu_s"] = cpu
            records += fresh
            mine = [r for r in fresh if r.get("stage") == index]
            nxt = phase
            if phase == "build" and any(r["event"] in ("stage_start", "resume", "train") for r in mine):
                nxt = "train"
            if any(r["event"] == "train" and r["step"] == steps for r in mine):
                nxt = "finish"
            if nxt != phase:
                for rank, pid in ranks.items():
                    _reset_hwm(pid)
                phase = nxt
            if kill_after_checkpoint and any(r["event"] == "checkpoint" for r in mine):
                os.killpg(proc.pid, signal.SIGKILL)  # bash, torchrun and every rank, mid-stage
                proc.wait()
                killed = True
                break
            time.sleep(0.1)
    fresh, offset = _new_records(metrics, offset)
    records += fresh
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"stage {index} of {run_dir.name} failed (exit {proc.returncode}); see {log}")
    return {"seconds": round(time.perf_counter() - began, 1), "records": [r for r in records if r.get("stage") == index],
            "peak_rss_by_phase": peaks, "sampled_max_rss": {r: v[0] for r, v in rss.items()},
            "sampled_max_rss_anon": {r: v[1] for r, v in rss.items()}, "killed": killed}


# ------------------------------------------------------------------------------------- predictions

def cpu_device_terms(spec, stage) -> list[tuple[str, int]]:
    """The `device` accounting of one rank for this stage on CPU ranks: the compiler's own formula
    (stepc.compiler.memory.device_costs) for fp32 compute, frozen weights at the spec's precision."""
    from stepc.compiler.memory import device_costs, exact_costs

    fp32 = spec.model_copy(update={"train": spec.train.model_copy(update={"precision": "fp32"})})
    costs = dataclasses.replace(device_costs(fp32), frozen_bytes=exact_costs(spec).frozen_bytes)
    return costs.terms(stage.new_layers, stage.frozen_layers)


BASELINE = """
import json, resource
import stepc.runtime.loop.train, transformers  # what every rank imports before it builds anything
from transformers import AutoModelForCausalLM
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def baseline_rss(env: dict) -> int:
    """Peak RSS of a process that has imported the runtime: the part of a rank's RSS that is no tensor."""
    out = subprocess.run([sys.executable, "-c", BASELINE], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["rss"]


def compile_part(spec_path: Path, sets: list[str], work: Path, env: dict) -> Path:
    cmd = [sys.executable, "-m", "stepc.cli", "compile", str(spec_path), "--out", str(work / "runs"), "--force"]
    for item in sets:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"cannot compile {spec_path}:\n{done.stdout}{done.stderr}")
    return work / "runs" / tomllib.loads(spec_path.read_text())["experiment"]["name"]


def wait_for_memory(need: float, wait: float) -> float | None:
    """Available memory once it is at least `need` (polling up to `wait` s), else None."""
    deadline = time.time() + wait
    while True:
        available = psutil.virtual_memory().available
        if available >= need:
            return available
        if time.time() > deadline:
            return None
        print(f"  waiting for memory: {available / 1e9:.1f} GB available, {need / 1e9:.1f} GB wanted", flush=True)
        time.sleep(15)


# ---------------------------------------------------------------------------------------- figures

def sha256_files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


HF_LOAD = """
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
began = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - began, "params": sum(p.numel() for p in model.parameters()),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def hf_load(export: Path, env: dict) -> dict:
    out = subprocess.run(["nice", "-n", "10", sys.executable, "-c", HF_LOAD, str(export)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


MATMUL = """
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
rates = {}
for label, m, k, n in json.loads(sys.argv[2]):
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    wall, cpu = [], []
    for _ in range(5):
        t, c = time.perf_counter(), time.process_time()
        a @ b
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rates[label] = [2 * m * k * n / statistics.median(wall), 2 * m * k * n / statistics.median(cpu)]
print(json.dumps(rates))
"""


def matmul_peak(model, threads: int, env: dict) -> dict:
    """fp32 FLOP/s of the layer's GEMMs (one micro-batch of tokens) with `threads` threads in each of RANKS
    concurrent processes, as the ranks run; the peak is the best shape's rate summed over the processes."""
    from stepc.schema.shapes import LOSS_CHUNK_TOKENS, linear_shapes

    tokens = model.seq_len
    shapes = [(name, tokens, i, o) for name, (i, o) in linear_shapes(model).items()
              if name in ("q_proj", "gate_proj", "down_proj")]
    shapes.append(("lm_head", min(tokens, LOSS_CHUNK_TOKENS), model.hidden_size, model.embedding_rows))
    procs = [subprocess.Popen([sys.executable, "-c", MATMUL, str(threads), json.dumps(shapes)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(RANKS)]
    results = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    per_shape = {label: sum(r[label][0] for r in results) for label in results[0]}  # wall: both processes at once
    per_cpu_s = {label: statistics.median(r[label][1] for r in results) for label in results[0]}  # FLOPs per CPU-second
    return {"per_shape_flops": per_shape, "peak_flops": max(per_shape.values()), "per_shape_flops_per_cpu_s": per_cpu_s,
            "peak_flops_per_cpu_s": max(per_cpu_s.values()), "threads_per_process": threads, "processes": RANKS}


def step_cpu_seconds(records: list[dict]) -> list[float | None]:
    """CPU seconds of both ranks for each train record's step: since the record before it (a merge belongs
    to its step; a checkpoint, eval, stage start or resume ends the previous span)."""
    out, last = [], None
    for record in records:
        if record["event"] == "merge":
            continue
        if record["event"] == "train":
            out.append(record["_cpu_s"] - last if last is not None else None)
        last = record.get("_cpu_s")
    return out


def stage_figures(run_dir: Path, index: int, run: dict, baseline: int, matmul: dict) -> dict:
    from stepc.schema.manifest import load_manifest
    from stepc.schema.shapes import model_flops_per_token

    manifest = load_manifest(run_dir)
    spec, stage = manifest.spec, manifest.plan.stages[index - 1]
    train = [r for r in run["records"] if r["event"] == "train"]
    steady = train[1:] or train  # the first step pays one-time costs (allocations, first-touch pages)
    tps = statistics.median(r["tokens_per_s"] for r in steady) if steady else None
    cpu = step_cpu_seconds(run["records"])
    per_cpu = [spec.train.global_batch_tokens / c for c in cpu[1:] or cpu if c]  # tokens per CPU-second, steady steps
    tpc = statistics.median(per_cpu) if per_cpu else None
    peak_flops, peak_cpu = matmul["peak_flops"], matmul["peak_flops_per_cpu_s"]
    terms = cpu_device_terms(spec, stage)
    predicted = sum(v for _, v in terms)
    peaks = run["peak_rss_by_phase"]
    train_peak = max(peaks.get("train", {}).values(), default=None)
    build_peak = max(peaks.get("build", {}).values(), default=None)
    finish_peak = max(peaks.get("finish", {}).values(), default=None)
    per_token = model_flops_per_token(spec.model, stage.new_layers, stage.frozen_layers, spec.step.lora_rank)
    checkpoints = [r for r in run["records"] if r["event"] == "checkpoint"]
    step_dirs = sorted((run_dir / "checkpoints" / f"stage-{index}").glob("step-*"))
    out = {
        "stage": index, "layers": stage.total_layers, "new_layers": stage.new_layers, "frozen_layers": stage.frozen_layers,
        "steps": stage.steps, "seconds": run["seconds"],
        "model_state_bytes": [r["model_state_bytes"] for r in train],
        "predicted_model_state_bytes": train[0]["predicted_model_state_bytes"] if train else None,
        "exact_model_state_bytes_plan": stage.exact_model_state_bytes,
        "tokens_per_s_each_step": [r["tokens_per_s"] for r in train], "tokens_per_s": tps,
        "model_flops_per_token": per_token, "achieved_flops": tps * per_token if tps else None,
        "cpu_mfu": tps * per_token / peak_flops if tps and peak_flops else None,
        "cpu_seconds_each_step": cpu, "tokens_per_cpu_s": tpc,
        "cpu_mfu_per_cpu_s": tpc * per_token / peak_cpu if tpc else None,  # both sides in CPU-seconds: load-robust
        "peak_rss_by_phase": peaks, "sampled_max_rss": run["sampled_max_rss"],  # VmHWM by phase; sampled every 0.1 s
        "sampled_max_rss_anon": run["sampled_max_rss_anon"],
        "runtime_peak_memory_bytes_rank0": max((r["peak_memory_bytes"] for r in train), default=None),
        "cpu_device_terms_per_rank": terms, "cpu_device_bytes_per_rank": predicted, "baseline_rss": baseline,
        "train_peak_rss_max_rank": train_peak, "build_peak_rss_max_rank": build_peak,
        "finish_peak_rss_max_rank": finish_peak,  # the final eval and the export (rank 0 gathers the whole model)
        "rss_over_prediction": train_peak / (predicted + baseline) if train_peak else None,
        "rss_minus_baseline_over_device_terms": (train_peak - baseline) / predicted if train_peak else None,
        "growth_over_training_peak": build_peak / train_peak if index > 1 and build_peak and train_peak else None,
        "checkpoint_write_s": [r.get("seconds") for r in checkpoints],
        "checkpoint_bytes": dir_bytes(step_dirs[0]) if step_dirs else None,
        "losses": [r["loss"] for r in train], "events": [r["event"] for r in run["records"]],
        "load_average_after": os.getloadavg(),
    }
    predicted_states = out["predicted_model_state_bytes"]
    out["model_state_bytes_equal"] = bool(train) and all(b == predicted_states for b in out["model_state_bytes"])
    return out


# ----------------------------------------------------------------------------------- the plain loop

def plain_loop(run_dir: Path, steps: int, threads: int) -> dict:
    """The loop a researcher would write for stage 1: one process, HF LlamaForCausalLM in fp32, AdamW
    (foreach, as the runtime on CPU), the runtime's sampler, the same tokens per step, `threads` threads."""
    import torch
    from transformers import LlamaForCausalLM

    from stepc.runtime.data.prepared import open_prepared, training_sets
    from stepc.runtime.model.llama import llama_config
    from stepc.schema.manifest import load_manifest

    torch.set_num_threads(threads)
    manifest = load_manifest(run_dir)
    spec, stage = manifest.spec, manifest.plan.stages[0]
    sampler, _ = training_sets(open_prepared(run_dir, spec.data, spec.model.seq_len), spec.data.holdout_fraction,
                               spec.experiment.seed)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(spec.model, stage.total_layers)).train()
    tr = spec.train
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, foreach=True)
    rows = tr.global_batch_tokens // spec.model.seq_len
    times, cpu = [], []
    for i in range(steps + 1):  # +1: the first step is warm-up, as the runtime's first record is left out
        began, began_cpu = time.perf_counter(), time.process_time()
        x = torch.from_numpy(sampler.batch(i, 0, 0, 1, rows, 1))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)  # every thread of the process
    rates = [tr.global_batch_tokens / t for t in times[1:]]
    per_cpu = [tr.global_batch_tokens / c for c in cpu[1:]]
    return {"tokens_per_s_each_step": rates, "tokens_per_s": statistics.median(rates), "threads": threads,
            "tokens_per_cpu_s_each_step": per_cpu, "tokens_per_cpu_s": statistics.median(per_cpu),
            "layers": stage.total_layers}


# ------------------------------------------------------------------------------- 1.2B meta, shard, fill

def meta_fill(run_dir: Path, index: int, figures: Path) -> None:
    """Every rank (torchrun, gloo): build stage `index` on meta, shard, fill (the runtime's setup.build;
    stage 2 grows from stage 1's export, as the runtime does); its peak RSS over the shard's prediction.
    Stage 1 then writes its export (rank 0 gathers the whole model, after the measurement). One process
    per stage, so each build starts from a clean process."""
    import torch
    import torch.distributed as dist

    from stepc.compiler.memory import exact_costs
    from stepc.rundir import RunDir
    from stepc.runtime.loop import checkpoint as ckpt
    from stepc.runtime.loop.setup import Stage, build
    from stepc.runtime.model.export import write_export
    from stepc.schema.manifest import load_manifest

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    manifest = load_manifest(run_dir)
    spec, plan = manifest.spec, manifest.plan
    stage = plan.stages[index - 1]
    costs = exact_costs(spec)
    st = Stage(run_dir, spec, plan, stage, rank, world, torch.device("cpu"))
    before = _status(os.getpid())["VmRSS"]
    _reset_hwm(os.getpid())
    began = time.perf_counter()
    trainee = build(st, RunDir(run_dir).final_export(index - 1) if index > 1 else None)
    seconds = time.perf_counter() - began
    peak = _status(os.getpid())["VmHWM"]
    trained = costs.trainable_params(stage.new_layers, stage.frozen_layers)
    frozen = costs.frozen_params(stage.new_layers, stage.frozen_layers)
    shard = (4 * trained + costs.frozen_bytes * frozen) / world  # fp32 trained weights, frozen at the precision
    local = sum(p.to_local().numel() * p.to_local().element_size() if hasattr(p, "to_local")
                else p.numel() * p.element_size() for p in trainee.model.parameters())
    out = {"rank": rank, "world": world, "stage": index, "layers": stage.total_layers, "seconds": seconds,
           "rss_before": before, "peak_rss": peak, "shard_predicted_bytes": shard, "shard_measured_bytes": local,
           "peak_over_shard": (peak - before) / shard, "peak_with_baseline_over_shard": peak / shard}
    if index < len(plan.stages):
        state = ckpt.full_model_state(trainee.model)
        if rank == 0:
            write_export(state, spec, stage.total_layers, RunDir(run_dir).final_export(index), None)
        dist.barrier()
    figures.with_suffix(f".rank{rank}.json").write_text(json.dumps(out) + "\n")
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- parts

class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, log: Path) -> None:
        self.args, self.work, self.log = args, work, log
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHON": sys.executable}
        self.threads = max(1, (os.cpu_count() or 1) // RANKS)  # what the runtime gives each CPU rank
        self.baseline = baseline_rss(self.env)

    def helper(self, args: list[str], figures: Path, torchrun: bool = False) -> dict:
        """This file in another process (or RANKS processes under torchrun); its JSON figures."""
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--figures", str(figures)]
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", *cmd[1:]]
        with open(self.log, "a") as handle:
            handle.write(f"\n===== {' '.join(cmd)}\n")
            handle.flush()
            subprocess.run(["nice", "-n", "10", *cmd], cwd=self.work, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                           check=True)
        if torchrun:
            return {"ranks": [json.loads(figures.with_suffix(f".rank{r}.json").read_text()) for r in range(RANKS)]}
        return json.loads(figures.read_text())

    def memory_gate(self, spec_path: Path, sets: list[str]) -> tuple[Path, dict | None, dict]:
        """Compile; (run_dir, a skip record or None, the prediction)."""
        run_dir = compile_part(spec_path, sets, self.work, self.env)
        from stepc.schema.manifest import load_manifest

        manifest = load_manifest(run_dir)
        per_stage = {s.index: sum(v for _, v in cpu_device_terms(manifest.spec, s)) for s in manifest.plan.stages}
        need = RANKS * (max(per_stage.values()) + self.baseline)
        prediction = {"cpu_device_bytes_per_rank_by_stage": per_stage, "baseline_rss": self.baseline,
                      "predicted_total_bytes": need, "memory_limit": self.args.memory_limit}
        if need > self.args.memory_limit:
            reason = (f"predicted peak {need / 1e9:.1f} GB over {RANKS} ranks (CPU device accounting + "
                      f"{self.baseline / 1e9:.2f} GB process baseline each) exceeds the "
                      f"{self.args.memory_limit / 1e9:.0f} GB this machine can give (--memory-limit)")
            return run_dir, {"skipped": reason}, prediction
        available = wait_for_memory(need * 1.05, self.args.wait)
        if available is None:
            return run_dir, {"skipped": f"{psutil.virtual_memory().available / 1e9:.1f} GB available after waiting "
                                        f"{self.args.wait:.0f} s, {need / 1e9:.1f} GB predicted"}, prediction
        prediction["available_at_start"] = available
        return run_dir, None, prediction

    def step_part(self, part: str) -> dict:
        """Both stages of a STEP-2 spec; for 368m also kill -9 + resume and the plain loop."""
        spec_path = ROOT / "specs" / SPECS[part]
        sets = overrides(part, self.args.steps, self.args.smoke)
        run_dir, skip, prediction = self.memory_gate(spec_path, sets)
        out: dict = {"spec": str(spec_path.relative_to(ROOT)), "overrides": sets, **prediction}
        if skip:
            return {**out, **skip}
        from stepc.rundir import RunDir
        from stepc.schema.manifest import load_manifest

        model = load_manifest(run_dir).spec.model
        peak = matmul_peak(model, self.threads, self.env)
        out["matmul"] = peak
        rd = RunDir(run_dir)
        for index in (1, 2):
            run = run_stage(run_dir, index, self.work, self.env, self.log)
            out[f"stage_{index}"] = stage_figures(run_dir, index, run, self.baseline, peak)
            print(f"  {part} stage {index}: {run['seconds']:.0f} s", flush=True)
        out["export_bytes"] = dir_bytes(rd.export)
        out["export_sha256"] = sha256_files(rd.export)
        out["hf_load"] = hf_load(rd.export, self.env)
        if part == "368m" and not self.args.no_resume:
            out["kill_resume"] = self.kill_resume(run_dir, out["export_sha256"])
        if part == "368m" and not self.args.no_plain:
            stage1 = out["stage_1"]
            # one process holding what both ranks' shards hold, unsharded; the HF loss keeps every logit
            if wait_for_memory(RANKS * stage1["cpu_device_bytes_per_rank"] * 1.05, self.args.wait) is None:
                out["plain"] = {"skipped": "not enough free memory"}
                return out
            plain = self.helper(["--plain", str(run_dir), "--steps", str(max(1, stage1["steps"] - 1)),
                                 "--threads", str(os.cpu_count() or 1)], self.work / "plain.json")
            out["plain"] = plain
            out["runtime_over_plain"] = stage1["tokens_per_s"] / plain["tokens_per_s"] if stage1["tokens_per_s"] else None
            out["runtime_over_plain_per_cpu_s"] = (stage1["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"]
                                                   if stage1["tokens_per_cpu_s"] else None)
        return out

    def kill_resume(self, run_dir: Path, reference: dict) -> dict:
        """Stage 2 again from its start, kill -9 after its first checkpoint, rerun: the export must equal `reference`."""
        from stepc.rundir import RunDir

        rd = RunDir(run_dir)
        shutil.rmtree(rd.stage_dir(2))
        shutil.rmtree(rd.export)
        killed = run_stage(run_dir, 2, self.work, self.env, self.log, kill_after_checkpoint=True)
        if not killed["killed"]:
            return {"error": "stage 2 ended before its first checkpoint record; nothing was killed"}
        at = next(r["step"] for r in killed["records"] if r["event"] == "checkpoint")
        resumed = run_stage(run_dir, 2, self.work, self.env, self.log)
        print(f"  368m stage 2 killed after step {at} ({killed['seconds']:.0f} s), resumed ({resumed['seconds']:.0f} s)",
              flush=True)
        again = sha256_files(rd.export)
        resume = next((r for r in resumed["records"] if r["event"] == "resume"), {})
        return {"killed_after_step": at, "resumed_from_step": resume.get("step"), "checkpoint_read_s": resume.get("seconds"),
                "export_sha256": again, "bit_identical": bool(again) and again == reference,
                "killed_run_s": killed["seconds"], "resumed_run_s": resumed["seconds"],
                "resumed_peak_rss_by_phase": resumed["peak_rss_by_phase"]}

    def meta_part(self) -> dict:
        part = "1.2b-meta"
        spec_path = ROOT / "specs" / SPECS[part]
        sets = overrides(part, self.args.steps, self.args.smoke)
        run_dir = compile_part(spec_path, sets, self.work, self.env)
        from stepc.compiler.memory import exact_costs
        from stepc.schema.manifest import load_manifest

        manifest = load_manifest(run_dir)
        costs = exact_costs(manifest.spec)
        biggest = max(4 * costs.trainable_params(s.new_layers, s.frozen_layers)
                      + costs.frozen_bytes * costs.frozen_params(s.new_layers, s.frozen_layers) for s in manifest.plan.stages)
        # rank 0 also gathers stage 1's full state for its export (fp32, as write_export receives it)
        need = RANKS * (biggest / RANKS + self.baseline) + biggest
        train_rank = max(sum(v for _, v in cpu_device_terms(manifest.spec, s)) for s in manifest.plan.stages) + self.baseline
        total = psutil.virtual_memory().total
        verdict = "does not fit" if RANKS * train_rank > min(total, self.args.memory_limit) else "would fit"
        out: dict = {"spec": str(spec_path.relative_to(ROOT)), "overrides": sets, "predicted_total_bytes": need,
                     "training_predicted_bytes_per_rank": train_rank,
                     "training": f"training not attempted: the CPU device accounting puts one rank's peak at "
                                 f"{train_rank / 1e9:.1f} GB; {RANKS} ranks ({RANKS * train_rank / 1e9:.1f} GB) {verdict} in "
                                 f"this machine's {total / 1e9:.0f} GB (--memory-limit {self.args.memory_limit / 1e9:.0f} GB)"}
        if wait_for_memory(need * 1.05, self.args.wait) is None:
            available = psutil.virtual_memory().available
            return {**out, "skipped": f"{available / 1e9:.1f} GB available, {need / 1e9:.1f} GB wanted"}
        # the stage scripts' own data step (the build reads nothing of it, the runtime's Stage needs a prepared run)
        subprocess.run([sys.executable, "-m", "stepc.cli", "data", "prepare", str(run_dir), "--quiet"], cwd=self.work,
                       env=self.env, check=True, capture_output=True)
        began = time.perf_counter()
        builds = []
        for stage in manifest.plan.stages:
            builds += self.helper(["--meta-fill", str(run_dir), "--stage", str(stage.index)],
                                  self.work / f"meta-{stage.index}.json", torchrun=True)["ranks"]
        out["seconds"] = time.perf_counter() - began
        out["builds"] = builds
        out["worst_peak_over_shard"] = max(b["peak_over_shard"] for b in builds)
        return out


# --------------------------------------------------------------------------------------------- table

def _gb(value) -> str:
    return f"{value / 1e9:.2f}" if isinstance(value, (int, float)) else "-"


def _num(value, fmt: str = "{:.2f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def _goal(value, goal: float, at_most: bool) -> str:
    if not isinstance(value, (int, float)):
        return ""
    return " (met)" if (value <= goal if at_most else value >= goal) else " (NOT met)"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpus']} CPUs, {m['torch_threads_per_rank']} torch thread(s) per rank x {RANKS} ranks, "
             f"{m['memory_total_bytes'] / 1e9:.0f} GB RAM, torch {m['torch']}, load {m['load_before'][0]:.1f} before / "
             f"{result.get('load_after', [0])[0]:.1f} after; elapsed {result['elapsed_s']:.0f} s"]
    for part, p in result["parts"].items():
        if "skipped" in p:
            lines.append(f"{part}: skipped: {p['skipped']}")
            if "training" in p:
                lines.append(f"  {p['training']}")
            continue
        if part == "1.2b-meta":
            lines.append(f"{part}: {p['training']}")
            for s in p["builds"]:
                lines.append(f"  rank {s['rank']} stage {s['stage']} ({s['layers']} layers): build+fill {s['seconds']:.0f} s, "
                             f"peak RSS {_gb(s['peak_rss'])} GB ({_gb(s['rss_before'])} before), shard predicted "
                             f"{_gb(s['shard_predicted_bytes'])} GB (held {_gb(s['shard_measured_bytes'])}); "
                             f"(peak - before) / shard = {s['peak_over_shard']:.3f}"
                             f"{_goal(s['peak_over_shard'], GOALS['meta_fill'], True)}")
            continue
        lines.append(f"{part}: {p['spec']} --set {' '.join(p['overrides'])}")
        lines.append(f"  {'stage':>5} {'steps':>5} {'s':>5} {'states=exact':>12} {'tok/s':>7} {'MFU':>6} {'train GB':>8} "
                     f"{'pred GB':>7} {'ratio':>6} {'build GB':>8} {'grow/trn':>8} {'ckpt GB':>7} {'write s':>7}")
        for index in (1, 2):
            s = p[f"stage_{index}"]
            lines.append(f"  {index:>5} {s['steps']:>5} {s['seconds']:>5.0f} {str(s['model_state_bytes_equal']):>12} "
                         f"{_num(s['tokens_per_s'], '{:.1f}'):>7} {_num(s['cpu_mfu'], '{:.3f}'):>6} "
                         f"{_gb(s['train_peak_rss_max_rank']):>8} {_gb(s['cpu_device_bytes_per_rank'] + s['baseline_rss']):>7} "
                         f"{_num(s['rss_over_prediction'], '{:.3f}'):>6} {_gb(s['build_peak_rss_max_rank']):>8} "
                         f"{_num(s['growth_over_training_peak'], '{:.3f}'):>8} {_gb(s['checkpoint_bytes']):>7} "
                         f"{_num(s['checkpoint_write_s'][0] if s['checkpoint_write_s'] else None, '{:.1f}'):>7}")
        s1, s2 = p["stage_1"], p["stage_2"]
        worst_ratio = max(abs(s["rss_over_prediction"] - 1) for s in (s1, s2) if s["rss_over_prediction"])
        lines.append(f"  peak RSS / CPU device prediction: worst |ratio - 1| = {worst_ratio:.3f}"
                     f"{_goal(worst_ratio, GOALS['rss_ratio'], True)}; growth / training peak (stage 2) = "
                     f"{_num(s2['growth_over_training_peak'], '{:.3f}')}{_goal(s2['growth_over_training_peak'], 1.1, True)}")
        mfu = min(s["cpu_mfu"] for s in (s1, s2) if s["cpu_mfu"] is not None)
        lines.append(f"  CPU MFU, wall (matmul peak {p['matmul']['peak_flops'] / 1e9:.1f} GFLOP/s over {RANKS} x "
                     f"{p['matmul']['threads_per_process']} thread): stage 1 {s1['cpu_mfu']:.3f}, stage 2 {s2['cpu_mfu']:.3f}"
                     f"{_goal(mfu, GOALS['mfu'], False)}")
        per_cpu = [s["cpu_mfu_per_cpu_s"] for s in (s1, s2)]
        lines.append(f"  CPU MFU, per CPU-second (peak {p['matmul']['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-s; "
                     f"tokens per CPU-s {_num(s1['tokens_per_cpu_s'])}, {_num(s2['tokens_per_cpu_s'])}): stage 1 "
                     f"{_num(per_cpu[0], '{:.3f}')}, stage 2 {_num(per_cpu[1], '{:.3f}')}"
                     f"{_goal(min((v for v in per_cpu if v is not None), default=None), GOALS['mfu'], False)}")
        lines.append(f"  export {_gb(p['export_bytes'])} GB, AutoModelForCausalLM.from_pretrained "
                     f"{p['hf_load']['seconds']:.1f} s; peak RSS of the final eval + export (rank 0 gathers the model): "
                     f"stage 1 {_gb(s1['finish_peak_rss_max_rank'])} GB, stage 2 {_gb(s2['finish_peak_rss_max_rank'])} GB")
        if "kill_resume" in p:
            k = p["kill_resume"]
            lines.append(f"  kill -9 after stage 2's checkpoint at step {k.get('killed_after_step')}, rerun: resumed from step "
                         f"{k.get('resumed_from_step')}, DCP read {_num(k.get('checkpoint_read_s'), '{:.1f}')} s; export "
                         f"bit-identical: {k.get('bit_identical')}")
        if "runtime_over_plain" in p:
            lines.append(f"  runtime / plain loop (stage 1, medians): {p['stage_1']['tokens_per_s']:.1f} / "
                         f"{p['plain']['tokens_per_s']:.1f} tok/s = {p['runtime_over_plain']:.3f}"
                         f"{_goal(p['runtime_over_plain'], GOALS['runtime_over_plain'], False)}; per CPU-second "
                         f"{_num(p['stage_1']['tokens_per_cpu_s'])} / {_num(p['plain']['tokens_per_cpu_s'])} = "
                         f"{_num(p['runtime_over_plain_per_cpu_s'], '{:.3f}')}"
                         f"{_goal(p['runtime_over_plain_per_cpu_s'], GOALS['runtime_over_plain'], False)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=PARTS, help="run this part (repeatable; default: all)")
    parser.add_argument("--steps", type=int, default=4, help="train.reference_steps (default 4: 3 steps per stage)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through every code path (a few minutes)")
    parser.add_argument("--memory-limit", type=float, default=MEMORY_LIMIT, help="bytes both ranks may use (default 20e9)")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for free memory before skipping a part")
    parser.add_argument("--no-resume", action="store_true", help="368m: leave out the kill -9 + resume check")
    parser.add_argument("--no-plain", action="store_true", help="368m: leave out the plain-loop comparison")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary directory, deleted)")
    parser.add_argument("--out", type=Path, help="the JSON (default bench/results/scale[-smoke].json; the log beside it)")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--meta-fill", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        args.figures.write_text(json.dumps(plain_loop(args.plain, args.steps, args.threads)) + "\n")
        return 0
    if args.meta_fill:
        meta_fill(args.meta_fill, args.stage, args.figures)
        return 0
    import torch

    out = args.out or ROOT / "bench" / "results" / f"scale{'-smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    began = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="stepc-bench-scale-"))
    result: dict = {"command": " ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
                    "machine": {"cpus": os.cpu_count(), "torch_threads_per_rank": max(1, (os.cpu_count() or 1) // RANKS),
                                "ranks": RANKS, "memory_total_bytes": psutil.virtual_memory().total,
                                "torch": torch.__version__,
                                "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                                "load_before": os.getloadavg()},
                    "steps": args.steps, "smoke": args.smoke, "goals": GOALS, "parts": {}}

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - began, 1)
        result["load_after"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1) + "\n")

    try:
        work.mkdir(parents=True, exist_ok=True)
        write_data(work, 300_000 if args.smoke else 5_000_000)
        bench = Bench(args, work, log)
        result["machine"]["baseline_rss"] = bench.baseline
        for part in args.only or PARTS:
            print(f"{part} ...", flush=True)
            result["parts"][part] = bench.meta_part() if part == "1.2b-meta" else bench.step_part(part)
            save()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(table(result))
    print(f"wrote {out} (stage output: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
