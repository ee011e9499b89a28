"""`stepc submit RUN_DIR [--chain]`: hand a compiled run directory to SLURM.

Nothing is submitted unless the manifest, run.sbatch and every stage script are what was compiled
(`verified_stages`); run.sbatch checks them again when the job starts.

Without `chain`: one job, `sbatch RUN_DIR/run.sbatch`, that runs every stage in order.
With `chain`: one job per stage, each `--dependency=afterok:<previous job>` (and cancelled at once
when the previous stage fails), so every stage gets the full `launch.slurm.time` and its own
queue slot. The chained jobs run the same verified run.sbatch; STEPC_STAGES picks their stage.

sbatch runs in the current directory, which becomes the jobs' working directory: relative data
paths in the spec are relative to it (submit from the project root). STEPC_RUN_DIR tells
run.sbatch where the run directory is (SLURM runs a spooled copy of the script).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from stepc.commands.run import verify_scripts
from stepc.errors import UserError
from stepc.rundir import RunDir
from stepc.schema.manifest import load_manifest

_JOB_ID = re.compile(r"^\s*(\d+)(;\S+)?\s*$")


def verified_stages(run_dir: Path) -> list[int]:
    """The run's stage indices, once its manifest, run.sbatch and stage scripts are what was compiled
    (as `stepc run` checks before it runs anything): a job must never queue a script that was edited."""
    if not RunDir(run_dir).manifest.is_file():
        raise UserError(f"{run_dir} is not a compiled run directory (no manifest.json)", file=str(run_dir),
                        fix="pass the directory `stepc compile` wrote, e.g. runs/<experiment.name>")
    manifest = load_manifest(run_dir)
    verify_scripts(run_dir, manifest)
    return [stage.index for stage in manifest.plan.stages]


def require_sbatch(run_locally: str) -> None:
    """SLURM is here (`sbatch` on PATH), or a UserError that names ``run_locally``, the command that runs the work without it."""
    if shutil.which("sbatch") is None:
        raise UserError("SLURM not found: `sbatch` is not on PATH",
                        fix=f"run this on a SLURM login node (or load the slurm module), or run it locally with `{run_locally}`")


def _sbatch(script: Path, args: list[str], env: dict[str, str]) -> str:
    argv = ["sbatch", "--parsable", *args, str(script)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"sbatch failed: {exc}", fix="check that the SLURM controller is reachable (`sinfo`)") from None
    match = _JOB_ID.match(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    if result.returncode != 0 or match is None:
        detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise UserError(f"sbatch rejected {script}: {detail}",
                        fix="check launch.slurm (partition, time, account, cpus_per_task) against `sinfo`, "
                            "recompile and resubmit")
    return match.group(1)


def submit(run_dir: Path, chain: bool) -> list[str]:
    """Submit the run; return the job ids (one, or one per stage in order with `chain`)."""
    run_dir = Path(run_dir)
    require_sbatch("stepc run RUN_DIR")
    stages = verified_stages(run_dir)  # run.sbatch among them
    script = (run_dir / "run.sbatch").resolve()
    env = {k: v for k, v in os.environ.items() if k != "STEPC_STAGES"}
    env["STEPC_RUN_DIR"] = str(run_dir.resolve())
    logs = run_dir.resolve() / "logs"
    logs.mkdir(exist_ok=True)
    common = ["--export=ALL", f"--output={logs}/slurm-%x-%j.out"]  # never slurm-*.out in the submit directory
    if not chain:
        return [_sbatch(script, common, env)]
    name = _job_name(script)
    ids: list[str] = []
    for index in stages:
        args = [*common, f"--job-name={name}-stage-{index}"]
        if ids:
            args += [f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes"]
        ids.append(_sbatch(script, args, {**env, "STEPC_STAGES": str(index)}))
    return ids


def _job_name(script: Path) -> str:
    """The `#SBATCH --job-name` of run.sbatch (the experiment name)."""
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --job-name="):
            return line.split("=", 1)[1].strip().strip("'\"")
    return script.parent.name
