"""`stepc run RUN_DIR`: the stage scripts in order on this machine, as one launch.

Before anything runs: the manifest's content hash plus every script's recorded hash (a replaced or
edited stage script is never executed), then the run directory's lock (runlock.py; the stage
scripts inherit it through STEPC_RUN_LOCK), then the data preparation (`stepc data prepare`).

Exit codes: 0 done; 2 a refusal (ours, or a stage's preflight, whose message is passed through);
130 interrupted (Ctrl-C or SIGTERM: the stage finishes its step in flight and checkpoints, one line
says where it stopped); 1 a stage failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from stepc.errors import UserError
from stepc.hashing import digest
from stepc.rundir import RunDir
from stepc.runlock import ENV as LOCK_ENV
from stepc.runlock import acquire, release
from stepc.runtime.loop.preempt import EXIT_STOPPED  # stage.sh: stopped by a signal after checkpointing
from stepc.schema.manifest import Manifest

EXIT_REFUSED = 2


def verify_scripts(run_dir: Path, manifest: Manifest, submitted: Path | None = None) -> None:
    """The manifest is unedited and every script it records is there with the recorded bytes (also
    `submitted`, SLURM's copy of run.sbatch, when given: run.sbatch checks itself before it runs).
    The problems are Manifest.problems'; the other compiled files do not run (`stepc verify` reports them)."""
    for problem in manifest.problems(run_dir):
        if problem.kind == "manifest":
            raise UserError("manifest.json was edited after compilation (its content hash does not match)",
                            file=str(RunDir(run_dir).manifest),
                            fix=f"recompile the spec with `stepc compile SPEC --force` (checkpoints are kept); "
                                f"`stepc verify {run_dir}` shows what differs")
        if problem.kind == "file" and problem.name.endswith((".sh", ".sbatch")):
            raise UserError(problem.sentence, file=str(run_dir / problem.name),
                            fix=f"recompile with `stepc compile SPEC --force` (or inspect with `stepc verify {run_dir}`); "
                                "to run an edited script on purpose, run it directly with --allow-edited-scripts")
    if submitted is not None and digest(Path(submitted).read_bytes()) != manifest.files.get("run.sbatch"):
        raise UserError("the submitted run.sbatch differs from the one the manifest records (edited before sbatch)",
                        file=str(submitted),
                        fix=f"recompile with `stepc compile SPEC --force` and resubmit with `stepc submit {run_dir}`")


def run_stages(run_dir: Path, manifest: Manifest, indices: list[int], stage_args: list[str] | None = None) -> int:
    """`stage_args` (--allow-data-change, --allow-version-change) are passed to every stage script."""
    verify_scripts(run_dir, manifest)
    lock = acquire(run_dir, command="stepc run")
    try:
        env = dict(os.environ)
        if lock is not None:
            env[LOCK_ENV] = lock["owner"]  # the stage scripts are this launch
        # Tokenise before any stage starts (the stage scripts repeat it; prepared data makes that a quick check).
        code = subprocess.call([sys.executable, "-m", "stepc.cli", "data", "prepare", str(run_dir)], env=env)
        if code:
            print(f"data preparation failed with exit code {code}", file=sys.stderr)
            return code
        return _run(run_dir, manifest.num_stages, indices, env, stage_args or [])
    finally:
        if lock is not None:
            release(run_dir)


def _run(run_dir: Path, total: int, indices: list[int], env: dict[str, str], stage_args: list[str]) -> int:
    for index in indices:
        print(f"== stage {index} of {total}", flush=True)
        code, interrupted = _call_stage(RunDir(run_dir).stage_script(index), env, stage_args)
        if interrupted or code == EXIT_STOPPED:
            stopped = _stopped(run_dir, index)
            where = (f"stage {index} stopped after step {stopped['step']} (checkpoint written)" if stopped
                     else f"stage {index} stopped (exit code {code})")
            print(f"interrupted: {where}; rerun `stepc run {run_dir}` to resume", file=sys.stderr, flush=True)
            return 130
        if code == EXIT_REFUSED:
            return EXIT_REFUSED  # the stage's preflight printed why (another launch, edited files, ...)
        if code:
            print(f"stage {index} failed with exit code {code}; rerun `stepc run {run_dir}` to resume", file=sys.stderr)
            return 1
    return 0


def _call_stage(script: Path, env: dict[str, str], args: list[str]) -> tuple[int, bool]:
    """Run one stage script; Ctrl-C / SIGTERM are passed to it and waited out (the stage checkpoints)."""
    proc = subprocess.Popen(["bash", str(script), *args], env=env)
    interrupted = []

    def forward(signum, frame):
        interrupted.append(signum)
        try:
            proc.send_signal(signum)  # bash forwards it to the workers; a duplicate of the terminal's is harmless
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait(), bool(interrupted)
            except KeyboardInterrupt:  # only if a handler was not installed in time
                interrupted.append(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(run_dir: Path, index: int) -> dict | None:
    try:
        return json.loads(RunDir(run_dir).stop_record(index).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m stepc.commands.run check RUN_DIR [SUBMITTED_SCRIPT]`: run.sbatch's first step. Exit 2
    naming the file when the manifest, a stage script or the submitted script differs from what was compiled."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] != "check":
        print("usage: python -m stepc.commands.run check RUN_DIR [SUBMITTED_SCRIPT]", file=sys.stderr)
        return 2
    from stepc.schema.manifest import load_manifest

    try:
        verify_scripts(Path(args[1]), load_manifest(args[1]), Path(args[2]) if len(args) == 3 else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
