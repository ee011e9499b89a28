"""`stepc report RUN_DIR...`: the paper's Table 2 shape for several runs, and their loss curves.

Reads only what runs wrote (manifest.json, metrics.jsonl, eval.json): peak model-state memory (planned
and measured), the process peak the runtime measured, validation perplexity, tokens and FLOPs, one row
per run. A run that has not finished is marked so and reports what it actually trained; damaged inputs
are named (exit 2).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.atomic import atomic_write_bytes
from stepc.rundir import manifest_path, read_regular_file, RunDir
from stepc.runtime.guard import is_exported
from stepc.schema.manifest import load_manifest
from stepc.schema.units import MODEL_STATE, PROCESS_PEAK, UNIT_NOTE, format_bytes


def read_run(run_dir: Path) -> dict[str, Any]:
    """One row of the report: the plan, and what the run actually did according to metrics.jsonl.

    An unfinished run (no complete export) is marked so, and its tokens, FLOPs and steps are those
    of the steps it trained, not the plan's; its perplexities are those of its last evaluation.
    """
    manifest = load_manifest(run_dir)
    paths = RunDir(manifest_path(run_dir).parent)
    plan = manifest.plan
    stages = {s.index: s for s in plan.stages}
    records = read_metrics(paths.metrics, set(stages))
    curve: dict[int, float] = {}
    done: dict[int, int] = {}
    for r in records:  # a resumed run logs some steps twice: the later line wins
        if r["event"] == "train":
            curve[stages[r["stage"]].data_step_offset + r["step"]] = r["loss"]
            done[r["stage"]] = max(done.get(r["stage"], 0), min(r["step"], stages[r["stage"]].steps))
        elif r["event"] == "stage_end":
            done[r["stage"]] = stages[r["stage"]].steps
    finished = is_exported(paths.export) and all(done.get(i) == s.steps for i, s in stages.items())
    evals = [r for r in records if r["event"] == "eval"]
    final_eval = {k[4:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("ppl_")}
    eval_json = paths.eval_result
    if finished and eval_json.is_file():
        final_eval.update(read_eval_json(eval_json))
    measured = [r["model_state_bytes"] for r in records if r["event"] == "train" and _number(r.get("model_state_bytes"))]
    process = [r["peak_memory_bytes"] for r in records if r["event"] == "train" and _number(r.get("peak_memory_bytes"))]
    if finished:
        status = "finished"
    else:
        current = max(done, default=1)
        status = f"unfinished: stage {current} of {len(stages)}, step {done.get(current, 0)} of {stages[current].steps}"
        if evals:
            status += f"; ppl at stage {evals[-1]['stage']} step {evals[-1].get('step', '?')}"
    origin = plan.sft.init_from if plan.sft is not None else None
    return {
        "name": manifest.spec.experiment.name, "method": plan.method, "layers": plan.layers,
        "run_dir": paths.root, "init_from": origin.run_dir if origin else None, "from": origin.experiment if origin else None,
        "peak_bytes": plan.peak_bytes, "measured_peak_bytes": max(measured) if measured else None,
        "process_peak_bytes": max(process) if process else None,
        "finished": finished, "status": status,
        "steps": sum(done.values()), "planned_steps": sum(s.steps for s in stages.values()),
        # tokens and FLOPs of the steps actually trained (each stage's are linear in its steps)
        "tokens": sum(stages[i].tokens * n // stages[i].steps for i, n in done.items() if stages[i].steps),
        "flops": sum(stages[i].flops * n / stages[i].steps for i, n in done.items() if stages[i].steps),
        "planned_tokens": sum(s.tokens for s in stages.values()),
        "planned_flops": sum(s.flops for s in stages.values()),
        "perplexity": final_eval, "curve": sorted(curve.items()),
        "boundaries": [s.data_step_offset for s in plan.stages[1:]],
    }


def read_metrics(path: Path, stage_indices: set[int]) -> list[dict[str, Any]]:
    """The records of metrics.jsonl that the report reads, checked; exit 2 naming the line of any other.

    A last line without its newline is what a killed writer leaves: it is skipped, not an error.
    """
    fix = "restore metrics.jsonl from the run (stepc writes one JSON object per line), or remove the damaged lines"
    if not path.exists():
        raise UserError("this run has no metrics yet", file=str(path.parent), fix=f"train it first: stepc run {path.parent}")
    data = read_regular_file(path, "metrics file", fix, 1 << 32)
    lines = data.split(b"\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            if lineno == len(lines):  # no trailing newline: a partial last write
                break
            raise UserError(f"line {lineno} is not a JSON record ({exc.__class__.__name__})", file=f"{path}:{lineno}",
                            fix=fix) from None
        problem = _record_problem(record, stage_indices)
        if problem:
            raise UserError(f"line {lineno}: {problem}", file=f"{path}:{lineno}", fix=fix)
        if isinstance(record, dict) and record.get("event") in ("train", "eval", "stage_end"):
            records.append(record)
    return records


def _record_problem(record: Any, stage_indices: set[int]) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a JSON object"
    event = record.get("event")
    if event not in ("train", "eval", "stage_end"):
        return None  # other events (merge, stage_start, ...) are not read here
    stage, step = record.get("stage"), record.get("step")
    if not (isinstance(stage, int) and stage in stage_indices):
        return f"{event} record of stage {stage!r}, which this run's plan does not have"
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return f"{event} record with step {step!r}, not a step number"
    if event == "train" and not _number(record.get("loss")):
        return f"train record with loss {record.get('loss')!r}, not a number"
    if event == "eval":
        bad = [k for k, v in record.items() if k.startswith("ppl_") and not _number(v)]
        if bad:
            return f"eval record with {bad[0]} = {record[bad[0]]!r}, not a number"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_eval_json(path: Path) -> dict[str, float]:
    fix = f"rerun `stepc eval {path.parent}` to rewrite it"
    data = read_regular_file(path, "eval result", fix, 1 << 24)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError("not a JSON eval result", file=str(path), fix=fix) from None
    ppl = obj.get("perplexity") if isinstance(obj, dict) else None
    if not isinstance(ppl, dict) or not all(isinstance(k, str) and _number(v) for k, v in ppl.items()):
        raise UserError("has no perplexity table of numbers", file=str(path), key="perplexity", fix=fix)
    return ppl


def with_lineage(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each SFT run preceded by the run it tuned ([sft] init_from, relative to the working directory like
    every path of a spec), when that run was not given too and its directory is there: the pre-training
    run and its instruction-tuned descendant side by side."""
    given = {Path(run["run_dir"]).resolve() for run in runs}
    out = []
    for run in runs:
        source = Path(run["init_from"]) if run["init_from"] else None
        if source is not None and source.resolve() not in given and (source / "manifest.json").is_file():
            out.append(read_run(source))
            given.add(source.resolve())
        out.append(run)
    return out


def markdown_table(runs: list[dict[str, Any]], columns: dict[str, dict[str, str]] | None = None) -> str:
    """One row per run; `columns` adds cells after the run name (run name -> column -> text), e.g. a sweep's values."""
    sets = sorted({name for run in runs for name in run["perplexity"]})
    extra = list(dict.fromkeys(c for cells in (columns or {}).values() for c in cells))
    lineage = any(run["from"] for run in runs)  # an SFT run: the run it tuned, beside it
    head = ["run", *extra, "method", *(["tuned from"] if lineage else []), "layout", "status", "steps", "model state (plan)",
            "model state (measured)", "process peak", "tokens", "FLOPs"] + [f"ppl {s}" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        steps = f"{run['steps']:,}" if run["finished"] else f"{run['steps']:,} of {run['planned_steps']:,}"
        layout = "->".join(map(str, _cumulative(run["layers"])))
        cells = [run["name"], *[(columns or {}).get(run["name"], {}).get(c, "-") for c in extra], run["method"],
                 *([run["from"] or "-"] if lineage else []), layout, run["status"], steps,
                 _bytes(run["peak_bytes"]), _bytes(run["measured_peak_bytes"]), _bytes(run["process_peak_bytes"]),
                 f"{run['tokens']:,}", f"{run['flops']:.3e}"]
        cells += [f"{run['perplexity'][s]:.2f}" if s in run["perplexity"] else "-" for s in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# under every report table: what its memory columns are
LEGEND = (f"Memory ({UNIT_NOTE}): {MODEL_STATE}, planned (the plan's peak stage, by its memory.accounting) and "
          f"measured (the largest over the run's train records, summed over ranks); {PROCESS_PEAK}, the largest "
          "of the run's train records.")


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


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
    if any(run["curve"] for run in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dirs: list[Path], out: Path, columns: dict[str, dict[str, str]] | None = None) -> str:
    """Read every run first (any problem: exit 2, nothing written), then write both files atomically."""
    if out.exists() and not out.is_dir() or out.is_symlink():
        raise UserError(f"{out} exists and is not a directory", key="--out", fix="pass --out a directory (created if missing)")
    runs = with_lineage([read_run(d) for d in run_dirs])
    table = markdown_table(runs, columns) + "\n\n" + LEGEND
    note = ""
    if any(not run["finished"] for run in runs):
        note = ("\nUnfinished runs show the steps, tokens and FLOPs trained so far, and the perplexity of their last "
                "evaluation, not final results.\n")
    png = loss_curves_png(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "report.md",
                           ("# stepc report\n\n" + table + "\n" + note + "\n![loss curves](loss.png)\n").encode())
        atomic_write_bytes(out / "loss.png", png)
    except OSError as exc:
        raise UserError(f"cannot write the report: {exc.strerror}", file=str(out), key="--out",
                        fix="pass --out a writable directory") from None
    return table + note

