"""`stepc report RUN_DIR...`: the paper's Table 2 shape for several runs, and their loss curves.

Reads only what runs wrote (manifest.json, metrics.jsonl, eval.json): peak model-state memory
(planned and measured), validation perplexity, tokens and FLOPs, one row per run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.rundir import RunDir
from stepc.schema.manifest import load_manifest


def read_run(run_dir: Path) -> dict[str, Any]:
    manifest = load_manifest(run_dir)
    plan = manifest.plan
    metrics_path = RunDir(run_dir).metrics
    if not metrics_path.is_file():
        raise UserError("this run has no metrics yet", file=str(run_dir), fix=f"train it first: stepc run {run_dir}")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    offsets = {s.index: s.data_step_offset for s in plan.stages}
    curve: dict[int, float] = {}
    for r in records:  # a resumed run logs some steps twice: the later line wins
        if r.get("event") == "train":
            curve[offsets[r["stage"]] + r["step"]] = r["loss"]
    evals = [r for r in records if r.get("event") == "eval"]
    final_eval = {k[4:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("ppl_")}
    eval_json = RunDir(run_dir).eval_result
    if eval_json.is_file():
        final_eval.update(json.loads(eval_json.read_text())["perplexity"])
    measured = [r["model_state_bytes"] for r in records if r.get("event") == "train" and r.get("model_state_bytes")]
    return {
        "name": manifest.spec.experiment.name, "method": plan.method, "layers": plan.layers,
        "peak_bytes": plan.peak_bytes, "measured_peak_bytes": max(measured) if measured else None,
        "tokens": sum(s.tokens for s in plan.stages), "flops": sum(s.flops for s in plan.stages),
        "perplexity": final_eval, "curve": sorted(curve.items()),
        "boundaries": [s.data_step_offset for s in plan.stages[1:]],
    }


def markdown_table(runs: list[dict[str, Any]]) -> str:
    sets = sorted({name for run in runs for name in run["perplexity"]})
    head = ["run", "method", "layout", "peak (plan)", "peak (measured)", "tokens", "FLOPs"] + [f"ppl {s}" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        measured = f"{run['measured_peak_bytes'] / 1e6:.2f} MB" if run["measured_peak_bytes"] else "-"
        cells = [run["name"], run["method"], "->".join(map(str, _cumulative(run["layers"]))),
                 f"{run['peak_bytes'] / 1e6:.2f} MB", measured, f"{run['tokens']:,}", f"{run['flops']:.3e}"]
        cells += [f"{run['perplexity'][s]:.2f}" if s in run["perplexity"] else "-" for s in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cumulative(layers: list[int]) -> list[int]:
    out, total = [], 0
    for n in layers:
        total += n
        out.append(total)
    return out


def loss_curves_png(runs: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run in runs:
        if not run["curve"]:
            continue
        steps, losses = zip(*run["curve"])
        (line,) = ax.plot(steps, losses, label=f"{run['name']} ({run['method']})", linewidth=1)
        for boundary in run["boundaries"]:
            ax.axvline(boundary, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("optimizer step (stage boundaries dotted)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dirs: list[Path], out: Path) -> str:
    runs = [read_run(d) for d in run_dirs]
    table = markdown_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("# stepc report\n\n" + table + "\n\n![loss curves](loss.png)\n")
    (out / "loss.png").write_bytes(loss_curves_png(runs))
    return table
