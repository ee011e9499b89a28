"""A small-scale Table 2 on CPU: vanilla, ReLoRA, GaLore and 2-stage STEP at equal FLOPs, plus STEP with
other growth operators (G_stack's stack, MIDAS's middle stack, LLaMA-Pro's block expansion) and with the
optimizer state carried across the growth.

The operator rows change only [step] growth_operator (and fpi/position for LLaMA-Pro): same layout (the
ILP does not depend on the operator), same FLOPs, same STEP regime (old layers frozen behind adapters).
They compare the *operators* inside STEP; they are not G_stack or MIDAS as published, which train the
whole grown model.

Each method is compiled from the same base spec (only [experiment] method and the method's own
settings differ), trained on the bundled corpus with the emitted stage scripts (1 CPU rank each,
so GaLore, which is not FSDP-aware, runs under the same conditions), then scored with `stepc eval`
on the same held-out split and validation set. Peak model-state memory is reported three ways:
the paper's Eq. 1-5 (decoder layers only, as the paper's Table 2 does), the exact prediction for
the whole model, and the bytes measured from the live tensors during training.

    python bench/quality.py [--reference-steps 600] [--methods vanilla step step-stack ...] [--jobs 2]
    # all 10 rows: 52 min on 2 idle cores with --jobs 2; table + bench/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# row name -> (experiment.method, extra [step] lines). STEP rows: the ILP's 2-stage layout (5+3 here).
# "growth" rows train the whole grown model (G_stack and MIDAS as published) on a pinned 4+4 layout:
# G_stack doubles the model (whole-model stack), MIDAS copies its middle 2-layer block twice.
VARIANTS = {
    "vanilla": ("vanilla", ""),
    "relora": ("relora", ""),
    "galore": ("galore", ""),
    "step": ("step", ""),  # the paper's choice: interpolation-mean, upper
    "step-stack": ("step", 'growth_operator = "stack"'),  # G_stack's operator inside STEP
    "step-stack-middle": ("step", 'growth_operator = "stack-middle"'),  # MIDAS's operator inside STEP
    "step-llama-pro": ("step", 'growth_operator = "interpolation-copy"\nposition = "spread"\nfpi = true'),
    "step-carry": ("step", "carry_optimizer_state = true"),
    "gstack": ("growth", 'growth_operator = "stack"'),
    "midas": ("growth", 'growth_operator = "stack-middle"\nstack_block = 2'),
}
METHODS = tuple(VARIANTS)

BASE = """
[experiment]
name = "quality-{name}"
seed = {seed}
method = "{method}"

[model]
hidden_size = 128
num_layers = 8
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 2048
seq_len = 128
tie_embeddings = true

[memory]
accounting = "{accounting}"
{stages}

[step]
lora_rank = 16
lora_alpha = 32
relora_reset_every = {reset}
restart_warmup_steps = 20
relora_warm_start_steps = {warm}
galore_rank = 32
galore_update_gap = 50
galore_scale = 0.25
{step_extra}

[train]
reference_steps = {steps}
global_batch_tokens = 2048
micro_batch_size = 16
lr = {lr}
warmup_steps = {warmup}
precision = "fp32"
checkpoint_every = {ckpt}

[data]
train = ["{root}/data/corpus/train/*.txt"]
tokenizer = "bpe-2048"

[data.validation]
milton = "{root}/data/corpus/validation/*.txt"

[eval]
every_steps = {ckpt}
max_tokens = 131072

[launch]
nproc_per_node = 1
"""


def spec_text(name: str, steps: int, seed: int, accounting: str = "exact") -> str:
    method, step_extra = VARIANTS[name]
    return BASE.format(
        name=name, seed=seed, method=method, step_extra=step_extra, accounting=accounting,
        stages={"step": "stages = 2", "growth": "layers = [4, 4]"}.get(method, ""),
        steps=steps, reset=max(20, steps // 4), warm=max(10, steps // 10), warmup=max(5, steps // 20),
        ckpt=max(10, steps // 2), lr=1e-2 if method == "galore" else 3e-3, root=ROOT.as_posix(),
    )


def stepc(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepc.cli", *args], check=True, text=True, capture_output=True, cwd=ROOT, **kw)


def run_method(method: str, steps: int, out: Path, threads: int, seed: int) -> dict:
    """Train and score one row of VARIANTS (`method` is the row name) with `threads` intra-op threads."""
    spec_path = out / f"{method}.toml"
    spec_path.write_text(spec_text(method, steps, seed))
    run_dir = out / f"quality-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)  # --force keeps checkpoints: a rerun would train nothing
    stepc("compile", str(spec_path), "--out", str(out))
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(run_dir)], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stepc("eval", str(run_dir))
    evaluation = json.loads((run_dir / "eval.json").read_text())["perplexity"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = max(r["model_state_bytes"] for r in records if r.get("event") == "train")
    paper_spec = out / f"{method}-paper.toml"
    paper_spec.write_text(spec_text(method, steps, seed, accounting="paper"))
    paper_peak = _plan_peak(paper_spec)
    from stepc.schema.plan import Plan

    plan = Plan.model_validate(manifest["plan"])
    return {
        "method": method, "layout": plan.layers, "steps": sum(s.steps for s in plan.stages),
        "tokens": sum(s.tokens for s in plan.stages), "flops": sum(s.flops for s in plan.stages),
        "ppl_heldout": evaluation["heldout"], "ppl_milton": evaluation["milton"],
        "paper_peak_bytes": paper_peak, "exact_peak_bytes": plan.peak_bytes, "measured_peak_bytes": measured,
        "wall_s": round(wall, 1), "seed": seed,
    }


def _plan_peak(spec_path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from stepc.compiler.load import load_spec
    from stepc.compiler.plan import make_plan

    spec, _ = load_spec(spec_path)
    return make_plan(spec).peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference-steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quality")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="rows to run; the first is the reference of the 'vs' columns (default: all, vanilla first)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    parser.add_argument("--seed", type=int, default=7, help="[experiment] seed of every row (init and data order)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows trained at once; each gets cpu_count/jobs threads (wall_s is then not comparable across runs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.results.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    done: dict[str, dict] = {}
    # Rows are independent runs in their own run directories; threads only wait on subprocesses.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_method, m, args.reference_steps, args.out, threads, args.seed) for m in args.methods]
        for future in as_completed(futures):
            row = future.result()
            done[row["method"]] = row
            print(f"done {row['method']} in {row['wall_s']} s", flush=True)
            # the finished rows so far: a long run cut short keeps what it measured
            partial = [done[m] for m in args.methods if m in done]
            out.write_text(json.dumps({"reference_steps": args.reference_steps, "rows": partial, "partial": True},
                                      indent=1) + "\n")
    rows = [done[m] for m in args.methods]
    vanilla = rows[0]
    header = (f"{'method':17} {'layout':>8} {'steps':>6} {'tokens':>10} {'FLOPs':>10} {'ppl held-out':>13} {'ppl milton':>11} "
              f"{'Eq.1-5 peak':>12} {'exact peak':>11} {'measured':>10} {'vs vanilla (Eq./meas.)':>23}")
    print(header)
    for r in rows:
        less_paper = 100 * (1 - r["paper_peak_bytes"] / vanilla["paper_peak_bytes"])
        less_measured = 100 * (1 - r["measured_peak_bytes"] / vanilla["measured_peak_bytes"])
        r["ppl_vs_vanilla_pct"] = round(100 * (r["ppl_heldout"] / vanilla["ppl_heldout"] - 1), 2)
        r["paper_peak_reduction_pct"], r["measured_peak_reduction_pct"] = round(less_paper, 1), round(less_measured, 1)
        print(f"{r['method']:17} {'+'.join(map(str, r['layout'])):>8} {r['steps']:6d} {r['tokens']:10,d} {r['flops']:10.3e} "
              f"{r['ppl_heldout']:13.2f} {r['ppl_milton']:11.2f} {r['paper_peak_bytes'] / 1e6:9.2f} MB "
              f"{r['exact_peak_bytes'] / 1e6:8.2f} MB {r['measured_peak_bytes'] / 1e6:7.2f} MB "
              f"{less_paper:10.1f}% / {less_measured:5.1f}%")
    out.write_text(json.dumps({"reference_steps": args.reference_steps, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
