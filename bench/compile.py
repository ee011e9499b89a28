"""Benchmark: stage-layout ILP solve time and whole `stepc compile` wall time.

For K in {2, 3, 10, 32} stages and L in {24, 64, 128} layers (K <= L), paper accounting, d = 2048, r = 128:

- solve: `stepc.compiler.layout.solve_layout` (Pyomo model build + solver + exact recomputation + canonical
  tie-break), median of --repeats calls in this process, for GLPK and HiGHS;
- compile: `python -m stepc.cli compile` in a fresh subprocess (includes Python start-up and imports),
  median of --compile-repeats runs, GLPK.

Prints a table and writes bench/results/compile.json. Goals (Appendix D reports 2-3 s at K ~ 10):
solve < 50 ms and whole compile < 1 s at K = 10.

    python bench/compile.py [--repeats 7] [--compile-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepc.compiler.layout import solve_layout
from stepc.compiler.memory import paper_costs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compile.json"
STAGES = (2, 3, 10, 32)
LAYERS = (24, 64, 128)
SOLVERS = ("glpk", "highs")
D, R = 2048, 128
GOAL_SOLVE_S, GOAL_COMPILE_S = 0.050, 1.0

SPEC = """\
[experiment]
name = "bench-l{layers}-k{stages}"
[model]
hidden_size = {d}
num_layers = {layers}
num_attention_heads = 32
[memory]
stages = {stages}
solver = "glpk"
accounting = "paper"
[step]
lora_rank = {r}
grow_at = {grow_at}
[train]
global_batch_tokens = 1179648
micro_batch_size = 8
[launch]
nproc_per_node = 8
"""


def time_solve(layers: int, stages: int, solver: str, repeats: int) -> tuple[float, list[int]]:
    costs = paper_costs(D, R)
    solve_layout(costs, layers, stages, solver)  # warm-up: imports, solver start-up
    times, layout = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        layout = solve_layout(costs, layers, stages, solver)
        times.append(time.perf_counter() - start)
    return statistics.median(times), layout.layers


def time_compile(layers: int, stages: int, repeats: int, workdir: Path) -> float:
    spec = workdir / f"l{layers}-k{stages}.toml"
    # with many stages, 0.75 of the reference steps per early stage would spend the whole FLOPs budget
    spec.write_text(SPEC.format(layers=layers, stages=stages, d=D, r=R, grow_at=round(min(0.75, 1.5 / stages), 4)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "stepc.cli", "compile", str(spec), "--out", str(workdir / "runs"),
                               "--force"], capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if done.returncode:
            raise SystemExit(f"stepc compile {spec.name} failed ({done.returncode}):\n{done.stderr}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="solves per (K, L, solver); the median is reported")
    parser.add_argument("--compile-repeats", type=int, default=3, help="subprocess compiles per (K, L)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="stepc-bench-") as tmp:
        for layers in LAYERS:
            for stages in STAGES:
                if stages > layers:
                    continue
                row = {"L": layers, "K": stages}
                for solver in SOLVERS:
                    row[f"solve_{solver}_s"], row[f"layers_{solver}"] = time_solve(layers, stages, solver, args.repeats)
                assert row["layers_glpk"] == row["layers_highs"], "solvers disagree on the canonical layout"
                row["compile_s"] = time_compile(layers, stages, args.compile_repeats, Path(tmp))
                rows.append(row)
                print(f"L={layers:3d} K={stages:2d}  glpk {1e3 * row['solve_glpk_s']:7.1f} ms  "
                      f"highs {1e3 * row['solve_highs_s']:7.1f} ms  compile {row['compile_s']:.2f} s", file=sys.stderr)

    header = f"{'L':>4} {'K':>3} {'glpk solve':>11} {'highs solve':>12} {'compile':>8}  layout"
    print(header)
    print("-" * len(header))
    for row in rows:
        layout = row["layers_glpk"]
        shown = str(layout) if len(layout) <= 6 else f"[{', '.join(map(str, layout[:5]))}, ... {layout[-1]}]"
        print(f"{row['L']:>4} {row['K']:>3} {1e3 * row['solve_glpk_s']:>8.1f} ms {1e3 * row['solve_highs_s']:>9.1f} ms "
              f"{row['compile_s']:>6.2f} s  {shown}")
    k10 = [r for r in rows if r["K"] == 10]
    goals = {
        "solve_under_50ms_at_k10": all(max(r["solve_glpk_s"], r["solve_highs_s"]) < GOAL_SOLVE_S for r in k10),
        "compile_under_1s_at_k10": all(r["compile_s"] < GOAL_COMPILE_S for r in k10),
    }
    print(f"goals at K=10: solve < 50 ms: {'met' if goals['solve_under_50ms_at_k10'] else 'NOT met'}; "
          f"whole compile < 1 s: {'met' if goals['compile_under_1s_at_k10'] else 'NOT met'}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "stepc compile", "accounting": "paper", "hidden_size": D, "lora_rank": R,
        "repeats": args.repeats, "compile_repeats": args.compile_repeats,
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "goals": goals, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
