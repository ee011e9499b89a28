"""`stepc run SWEEP_DIR [--max-parallel N]`: a sweep's points on this machine, without SLURM.

Each point is its run directory run by `stepc run RUN_DIR` in a process of its own, so each takes its
own run-directory lock (a point another launch holds is refused and reported, the others go on),
resumes from its newest checkpoint and passes Ctrl-C on like a single run. A finished point (its
export is complete) is skipped without starting anything. At most N points run at once (default 1);
on CPU the machine's cores are shared out between them (OMP_NUM_THREADS = CPUs / (N x ranks per
point), unless the environment sets it). Each point's output goes to RUN_DIR/logs/stepc-run.log;
the console shows one line per point started and finished, then a table: point, swept values,
status, final train loss, last evaluation, wall time. Exit code 1 names the points that failed
(2 when the sweep itself is refused, 130 when interrupted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from stepc.commands.sweep import verify_sweep
from stepc.rundir import RunDir
from stepc.runtime.guard import is_exported
from stepc.schema.manifest import load_manifest


@dataclass
class Outcome:
    name: str
    values: dict[str, object]
    status: str  # "finished", "skipped (finished)", "failed (exit N)", "refused (exit 2)", "interrupted"
    seconds: float | None
    log: Path | None


def run_sweep(sweep_dir: Path, max_parallel: int = 1) -> int:
    sweep_dir = Path(sweep_dir)
    record = verify_sweep(sweep_dir)  # sweep.json, sweep.sbatch and every point's manifest and scripts
    points = [(p, sweep_dir.parent / p.name) for p in record.points]
    todo, outcomes = [], {}
    for point, run_dir in points:
        if is_exported(RunDir(run_dir).export):
            outcomes[point.name] = Outcome(point.name, point.values, "skipped (finished)", None, None)
        else:
            todo.append((point, run_dir))
    ranks = max((load_manifest(d).spec.launch.nproc_per_node for _, d in todo), default=1)
    parallel = max(1, min(max_parallel, len(todo) or 1))
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and todo:
        from stepc.runtime.device import worker_threads

        env["OMP_NUM_THREADS"] = str(worker_threads(parallel * ranks))  # the points share this machine's cores
    print(f"sweep {record.name}: {len(points)} points, {len(points) - len(todo)} finished, "
          f"running {len(todo)} ({parallel} at a time)", flush=True)
    procs: dict[str, subprocess.Popen] = {}
    stopping: list[int] = []

    def run_point(item) -> Outcome:
        point, run_dir = item
        if stopping:
            return Outcome(point.name, point.values, "not started (interrupted)", None, None)
        log = RunDir(run_dir).root / "logs" / "stepc-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        print(f"{point.name}: started (log {log})", flush=True)
        with open(log, "a", encoding="utf-8") as out:
            proc = subprocess.Popen([sys.executable, "-m", "stepc.cli", "run", str(run_dir)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # Ctrl-C is forwarded once, below
            procs[point.name] = proc
            code = proc.wait()
        seconds = time.monotonic() - began
        status = {0: "finished", 2: "refused (exit 2)", 130: "interrupted"}.get(code, f"failed (exit {code})")
        print(f"{point.name}: {status} in {_duration(seconds)}" + ("" if code == 0 else f"; see {log}"), flush=True)
        return Outcome(point.name, point.values, status, seconds, log)

    def forward(signum, frame):
        stopping.append(signum)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)  # stepc run stops its stage after the step in flight, with a checkpoint

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(parallel) as pool:
            for outcome in pool.map(run_point, todo):
                outcomes[outcome.name] = outcome
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ordered = [outcomes[p.name] for p, _ in points]
    print(summary(ordered, list(record.grid), sweep_dir.parent))
    if stopping:
        print(f"interrupted; rerun `stepc run {sweep_dir}` to resume (finished points are skipped)", file=sys.stderr)
        return 130
    failed = [o for o in ordered if not o.status.startswith(("finished", "skipped"))]
    if failed:
        print(f"{len(failed)} of {len(ordered)} points did not finish: " + ", ".join(f"{o.name} ({o.status}; {o.log})"
                                                                                  for o in failed), file=sys.stderr)
        return 1
    return 0


def summary(outcomes: list[Outcome], keys: list[str], root: Path) -> str:
    """The end-of-sweep table: one row per point, its swept values, status, final loss, last eval, wall time."""
    rows = [["point", *keys, "status", "final loss", "last eval", "wall"]]
    for o in outcomes:
        loss, evaluation = _last_numbers(RunDir(root / o.name).metrics)
        rows.append([o.name, *(_text(o.values.get(k)) for k in keys), o.status, loss, evaluation,
                     "-" if o.seconds is None else _duration(o.seconds)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _last_numbers(path: Path) -> tuple[str, str]:
    """The last train loss and the last evaluation's perplexities, from metrics.jsonl ("-" when none)."""
    loss, evaluation = "-", "-"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return loss, evaluation
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict):
            continue
        if r.get("event") == "train" and isinstance(r.get("loss"), (int, float)):
            loss = f"{r['loss']:.4f}"
        elif r.get("event") == "eval":
            evaluation = ", ".join(f"{k[4:]} ppl {v:.2f}" for k, v in r.items()
                                   if k.startswith("ppl_") and isinstance(v, (int, float)))
    return loss, evaluation


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
