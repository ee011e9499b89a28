"""`stepc sweep SPEC --grid KEY=V1,V2 ...`: one run directory per grid point, one SLURM job array.

Every point is the spec with --set values, then the point's grid values, applied as overrides
(so each run's spec.toml, manifest and `stepc diff` show exactly what differs), plus experiment.name =
<base name>-<key><value>-..., derived from the point alone (deterministic) and recorded the same way.
Array tasks that share a head node never meet in one rendezvous: each task is its own job, and
run.sbatch's port is launch.rdzv_port + job id mod launch.rdzv_ports. (An extra per-point port
offset would collide exactly: task i with job id j+1 and task i+1 with job id j.)
All points are compiled before anything is written; a point that fails names itself and the
--grid/--set value. The sweep directory OUT/<base>.sweep/ holds sweep.json (the points and their
manifest hashes, the hashes of its other files and its own content hash: stepc.schema.sweep),
plan.md (the plans side by side) and sweep.sbatch (a job array whose task i runs point i's
run.sbatch). `stepc submit` verifies all of it, and every point's scripts, before queueing. One
array has one resource request, so points must agree on every #SBATCH line. `stepc submit`,
`stepc report` and `stepc run` accept the sweep directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepc import __version__
from stepc.compiler import Compiled, compile_spec, plan_spec
from stepc.compiler.load import read_spec_text
from stepc.compiler.overrides import Override, apply_overrides, blamed, check_distinct, parse_override, parse_overrides, recorded
from pydantic import ValidationError

from stepc.errors import UserError
from stepc.hashing import canonical_json, content_hash, digest
from stepc.rundir import entry_problem, files_entry_problem, MANIFEST, read_regular_file, SWEEP_FILE
from stepc.schema.sweep import SweepRecord

MAX_NAME = 100  # experiment.name's limit


@dataclass(frozen=True)
class Point:
    name: str
    values: list[Override]  # the grid values of this point, in --grid order
    compiled: Compiled


def sweep_dir_for(out: Path, base: str) -> Path:
    return out / f"{base}.sweep"


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def parse_grid(items: list[str], sets: list[Override]) -> list[list[Override]]:
    """Per --grid key, one override per value (values split at commas outside [] and quotes)."""
    if not items:
        raise UserError("stepc sweep needs at least one --grid KEY=V1,V2", fix="e.g. --grid train.lr=1e-3,3e-4")
    axes: list[list[Override]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = _split(raw) if sep else []
        if not values or any(v == "" for v in values):
            raise UserError(f"--grid {item!r} is not KEY=V1,V2,... with non-empty values", fix="e.g. --grid train.lr=1e-3,3e-4")
        axis = [parse_override(f"{key.strip()}={v}", "--grid") for v in values]
        if len({canonical_json(o.value) for o in axis}) != len(axis):
            raise UserError(f"--grid {item}: a value is given twice", key=axis[0].key, fix="give each value once")
        axes.append(axis)
    check_distinct(sets + [axis[0] for axis in axes])
    for axis in axes:
        if axis[0].key in ("experiment.name", "experiment") or axis[0].key.startswith("experiment.name."):
            raise UserError("--grid cannot sweep experiment.name: the sweep derives each run's name from its values",
                            key="experiment.name", fix="sweep other keys; the names are <base>-<key><value>-...")
    return axes


def _split(raw: str) -> list[str]:
    parts, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return parts


def point_name(base: str, values: list[Override]) -> str:
    """<base>-<key><value>-...: the last key component, unless two grid keys share it (then the whole key)."""
    lasts = [o.parts[-1] for o in values]
    labels = [o.parts[-1] if lasts.count(o.parts[-1]) == 1 else o.key for o in values]
    slug = lambda text: re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-._") or "x"  # noqa: E731
    name = "-".join([base, *(f"{slug(label)}{slug(o.raw)}" for label, o in zip(labels, values))])
    if len(name) > MAX_NAME:  # still deterministic: a prefix and a hash of the whole name
        name = name[: MAX_NAME - 13].rstrip("-.") + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def compile_sweep(spec_path: str, grid_items: list[str], set_items: list[str] | None) -> tuple[str, list[Point]]:
    """(base name, the compiled points); writes nothing."""
    from stepc.schema.trackers import check_log

    sets = parse_overrides(set_items)
    axes = parse_grid(grid_items, sets)
    original = read_spec_text(spec_path)
    with blamed(sets):
        base_spec, _ = plan_spec(apply_overrides(original, sets, spec_path), spec_path)
    check_log(base_spec.log, spec_path)
    base = base_spec.experiment.name
    combos = [list(values) for values in itertools.product(*axes)]
    _check_distinct_names(base, combos, spec_path)  # before compiling anything: the names depend on the values alone
    points: list[Point] = []
    for values in combos:
        name = point_name(base, values)
        own = [Override("experiment.name", name, f"experiment.name={json.dumps(name)}", json.dumps(name), "stepc sweep")]
        overrides = [*sets, *values, *own]
        try:
            with blamed(overrides):
                compiled = compile_spec(apply_overrides(original, overrides, spec_path), spec_path, recorded(overrides))
        except UserError as err:
            err.message = f"sweep point {name}: {err.message}"
            raise
        points.append(Point(name, values, compiled))
    _check_one_resource_request(points)
    return base, points


def _check_distinct_names(base: str, combos: list[list[Override]], file: str) -> None:
    """Two points must never share a run directory: names keep only lower-case letters, digits, '.', '_'
    and '-', so values that differ in case or punctuation alone (GPU and gpu, "a b" and "a-b") collide."""
    seen: dict[str, list[Override]] = {}
    for values in combos:
        name = point_name(base, values)
        if name in seen:
            other = seen[name]
            differ = [(a, b) for a, b in zip(other, values) if a.value != b.value]
            shown = "; ".join(f"{a.key} = {a.raw} and {b.raw}" for a, b in differ)
            raise UserError(f"two grid points get the same run name {name!r} ({shown}): a run name keeps only lower-case "
                            "letters, digits, '.', '_' and '-' of the values", file=file, key=", ".join(a.key for a, _ in differ),
                            fix="sweep values that differ in those characters, or sweep the others in a separate --out")
        seen[name] = values


def _sbatch_header(compiled: Compiled) -> list[str]:
    """run.sbatch's #SBATCH lines, less those the array sets itself (job name, output file)."""
    lines = compiled.files["run.sbatch"].decode().splitlines()
    return [ln for ln in lines if ln.startswith("#SBATCH") and not ln.startswith(("#SBATCH --job-name=", "#SBATCH --output="))]


def _check_one_resource_request(points: list[Point]) -> None:
    first = _sbatch_header(points[0].compiled)
    for point in points[1:]:
        header = _sbatch_header(point.compiled)
        if header != first:
            differ = sorted(set(header) ^ set(first))
            raise UserError(f"points {points[0].name} and {point.name} need different SLURM requests ({', '.join(differ)}); "
                            "one job array has one resource request",
                            key=", ".join(o.key for o in point.values),
                            fix="sweep keys that change nodes, time or partition in separate sweeps (or fix them with --set)")


def render_sweep(base: str, points: list[Point], sweep_dir: Path, max_parallel: int | None) -> dict[str, bytes]:
    from stepc.compiler.emit import _environment
    from stepc.compiler.plan_table import compare_plans

    keys = [o.key for o in points[0].values]
    table = compare_plans([(p.name, p.compiled.plan) for p in points])
    script = _environment().get_template("sweep.sbatch.j2").render(
        name=f"{base}-sweep", base=base, runs=[p.name for p in points], header=_sbatch_header(points[0].compiled),
        max_parallel=max_parallel, version=__version__, sweep_dir=str(sweep_dir))
    files = {"plan.md": f"# sweep {base}: {len(points)} runs\n\n```\n{table}\n```\n".encode(),
             "sweep.sbatch": script.encode()}
    record: dict[str, Any] = {
        "name": base,
        "grid": {k: [] for k in keys},
        "points": [{"name": p.name, "values": {o.key: o.value for o in p.values},
                    "manifest_hash": p.compiled.manifest["hash"]} for p in points],
        "files": {name: digest(data) for name, data in sorted(files.items())},
    }
    for p in points:
        for o in p.values:
            if o.value not in record["grid"][o.key]:
                record["grid"][o.key].append(o.value)
    record["hash"] = content_hash(record)
    return {SWEEP_FILE: (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(), **files}


def write_sweep(out: Path, base: str, points: list[Point], force: bool, max_parallel: int | None = None) -> Path:
    """Every run directory, then the sweep directory (its files vouch for the runs, so they go last)."""
    from stepc.compiler.emit import check_target, write_run_dir

    sweep_dir = sweep_dir_for(out, base)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in str(sweep_dir)):  # it is written into sweep.sbatch's comments
        raise UserError(f"the output root {str(out)!r} holds a control character (a newline would end a comment line "
                        "of sweep.sbatch and start a command)", key="--out", fix="pass an --out path without control characters")
    if not force:
        existing = [p.name for p in points if (out / p.name).exists()]
        if existing:
            raise UserError(f"run directories already exist: {', '.join(existing)}", key="experiment.name",
                            fix="pass --force to recompile them (checkpoints, logs and metrics are kept), or use another --out")
    for point in points:  # every target first: a taken one (a file, a foreign directory) must leave nothing written
        check_target(out / point.name, force)
    check_target(sweep_dir, force, marker=SWEEP_FILE)
    for point in points:
        write_run_dir(out / point.name, point.compiled.files, force)
    write_run_dir(sweep_dir, render_sweep(base, points, sweep_dir, max_parallel), force, marker="sweep.json")
    return sweep_dir


MAX_SWEEP_BYTES = 16 << 20


def read_sweep(sweep_dir: Path) -> SweepRecord:
    """The typed sweep.json; a UserError naming the file (and the key) when it is not one stepc wrote."""
    path = Path(sweep_dir) / SWEEP_FILE
    fix = "pass the directory `stepc sweep` wrote, or recompile the sweep with `stepc sweep ... --force`"
    data = read_regular_file(path, "sweep record", fix, MAX_SWEEP_BYTES)
    try:
        return SweepRecord.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"]) or None
        what = "not JSON" if first["type"] == "json_invalid" else first["msg"]
        raise UserError(f"not a sweep record stepc wrote: {what}", file=str(path), key=key, fix=fix) from None


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run directories (siblings of the sweep directory), in array order."""
    return [Path(sweep_dir).parent / p.name for p in read_sweep(sweep_dir).points]


def columns(sweep_dir: Path) -> dict[str, dict[str, str]]:
    """Run name -> grid key -> value as text, for the report table."""
    return {p.name: {k: json.dumps(v) if not isinstance(v, str) else v for k, v in p.values.items()}
            for p in read_sweep(sweep_dir).points}


def verify_sweep(sweep_dir: Path) -> SweepRecord:
    """Before a job array is queued: sweep.json unedited, sweep.sbatch the script it records, and every
    point's run directory the one compiled with it (its manifest hash), with its scripts intact."""
    from stepc.commands.run import verify_scripts
    from stepc.schema.manifest import load_manifest

    sweep_dir = Path(sweep_dir)
    record = read_sweep(sweep_dir)
    path = sweep_dir / SWEEP_FILE
    recompile = "recompile the sweep with `stepc sweep ... --force` (checkpoints are kept)"
    if record.hash != content_hash(record.model_dump(mode="json")):
        raise UserError("sweep.json was edited after `stepc sweep` wrote it (its content hash does not match)",
                        file=str(path), fix=recompile)
    for name, want in sorted(record.files.items()):
        problem = entry_problem(sweep_dir, name) if files_entry_problem(name, want) is None else f"{name}: bad entry"
        if problem is None and digest((sweep_dir / name).read_bytes()) != want:
            problem = f"{name} differs from the file sweep.json records"
        if problem:
            raise UserError(problem, file=str(sweep_dir / name), fix=recompile)
    for point in record.points:
        run_dir = sweep_dir.parent / point.name
        if not (run_dir / MANIFEST).is_file():
            raise UserError(f"the sweep's run directory {point.name} is missing (no manifest.json)", file=str(run_dir),
                            fix=recompile)
        manifest = load_manifest(run_dir)
        if manifest.hash != point.manifest_hash:
            raise UserError(f"{point.name} was recompiled after the sweep (its manifest hash is not the one sweep.json "
                            "records)", file=str(run_dir / MANIFEST), fix=recompile)
        verify_scripts(run_dir, manifest)
    return record


def submit_sweep(sweep_dir: Path) -> str:
    """sbatch the job array, once `verify_sweep` passes; the array's job id."""
    import os

    from stepc.commands.submit import _sbatch, require_sbatch

    sweep_dir = Path(sweep_dir)
    require_sbatch("stepc run RUN_DIR")
    verify_sweep(sweep_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("STEPC_STAGES", "STEPC_RUN_DIR")}
    env["STEPC_SWEEP_DIR"] = str(sweep_dir.resolve())
    logs = sweep_dir.resolve() / "logs"
    logs.mkdir(exist_ok=True)  # SLURM does not create the output's directory
    return _sbatch((sweep_dir / "sweep.sbatch").resolve(), ["--export=ALL", f"--output={logs}/slurm-%x-%A_%a.out"], env)
