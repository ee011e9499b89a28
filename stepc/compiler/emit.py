"""The emit pass: render the run directory's files and write them atomically.

`render_files` is pure (spec, plan -> name -> bytes); `write_run_dir` is the only code in the
compiler that touches the disk. Files are staged in a temporary sibling directory and moved in,
so a crash never leaves a half-written run directory that looks complete.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import jinja2

from stepc import __version__
from stepc.compiler.figure import memory_png
from stepc.schema.methods import METHODS
from stepc.compiler.plan_table import plan_table
from stepc.errors import UserError
from stepc.schema.plan import Plan
from stepc.schema.spec import Spec
from stepc.schema.units import format_bytes


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("stepc.templates"))),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))  # every spec string reaching a shell is quoted
    return env


def render_files(spec: Spec, plan: Plan, spec_text: str) -> dict[str, bytes]:
    """Every compiled file except manifest.json, by name."""
    env = _environment()
    common = {"name": spec.experiment.name, "version": __version__, "stages": plan.stages, "launch": spec.launch,
              "slurm": spec.launch.slurm, "plan": plan}
    files: dict[str, bytes] = {"spec.toml": spec_text.encode()}
    for stage in plan.stages:
        summary = f"{stage.frozen_layers} frozen + {stage.new_layers} new layers, {stage.steps} steps"
        if METHODS[plan.method].old_layers == "trained":  # nothing is frozen: the whole grown model trains
            summary = f"{stage.total_layers} layers ({stage.new_layers} new), all trained, {stage.steps} steps"
        if plan.sft is not None:  # method "sft": the init_from run's layers, all trained
            summary = f"{stage.total_layers} layers of {plan.sft.init_from.run_dir}'s export, all trained, {stage.steps} steps"
        files[f"stage-{stage.index}.sh"] = env.get_template("stage.sh.j2").render(common, stage=stage,
                                                                                  stage_summary=summary).encode()
    files["run.sbatch"] = env.get_template("run.sbatch.j2").render(common).encode()
    files["plan.md"] = env.get_template("plan.md.j2").render(
        common, table=plan_table(plan), vanilla=format_bytes(plan.vanilla_peak_bytes), peak=format_bytes(plan.peak_bytes),
        reduction=f"{100 * plan.reduction:.1f}%", budget=format_bytes(plan.budget_bytes) if plan.budget_bytes else None,
    ).encode()
    files["memory.png"] = memory_png(plan, f"{spec.experiment.name}: model states per stage")
    return files


def write_run_dir(run_dir: Path, files: dict[str, bytes], force: bool, marker: str = "manifest.json") -> None:
    """Write `files` into `run_dir`; with `force`, replace compiled files but keep checkpoints and logs.

    `marker` is the file that makes an existing directory one of ours (a sweep directory's is sweep.json):
    --force never writes into a non-empty directory without it."""
    check_target(run_dir, force, marker)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    except OSError as exc:
        raise UserError(f"cannot create the run directory: {exc}", fix="choose a writable --out directory") from None
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a run directory is shared like any other
        for name, data in files.items():
            path = staging / name
            path.write_bytes(data)
            os.chmod(path, 0o755 if name.endswith((".sh", ".sbatch")) else 0o644)
        (staging / "logs").mkdir()  # run.sbatch's `#SBATCH --output=runs/<name>/logs/...` needs it at submit time
        if not run_dir.exists():
            os.replace(staging, run_dir)
            return
        (run_dir / "logs").mkdir(exist_ok=True)
        for stale in run_dir.glob("stage-*.sh"):  # a recompile with fewer stages must not leave old scripts behind
            if stale.name not in files:
                stale.unlink()
        for name in sorted(files, key=lambda n: n == "manifest.json"):  # the manifest last: it vouches for the rest
            os.replace(staging / name, run_dir / name)
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc}", fix="check permissions and free disk space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_target(run_dir: Path, force: bool, marker: str = "manifest.json") -> None:
    """Raise the UserError `write_run_dir` would raise for `run_dir` before it writes anything, so a
    command that writes several directories (stepc sweep) can check them all first and write none
    when one is taken."""
    if run_dir.parent.exists() and not run_dir.parent.is_dir():
        raise UserError(f"the output root {run_dir.parent} is a file, not a directory", key="--out",
                        fix="pass --out a directory (it is created if missing)")
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"{run_dir} exists and is {'a symlink' if run_dir.is_symlink() else 'not a directory'}, so it cannot "
                        "be a run directory (--force replaces compiled files inside a run directory, never other files)",
                        key="experiment.name", fix=f"move {run_dir} away, or choose another experiment.name or --out")
    if run_dir.exists() and not force:
        raise UserError(f"run directory {run_dir} already exists", key="experiment.name",
                        fix="compile elsewhere (--out DIR) or under another name (--set experiment.name=NEW), or pass "
                            "--force to recompile it in place (its checkpoints, logs and metrics are kept)")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / marker).is_file():
        raise UserError(f"{run_dir} is a non-empty directory without {marker}: not one stepc wrote, and --force "
                        "would write stage scripts into it", key="experiment.name",
                        fix=f"move {run_dir} away, or choose another experiment.name or --out")
