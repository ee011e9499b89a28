"""`python -m stepc.runtime --manifest RUN_DIR/manifest.json --stage I`: run by torchrun on every rank."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from stepc.errors import UserError
from stepc.runtime.guard import ALLOWABLE, RuntimeFailure, preflight

EXIT_COMPLETE = 3  # --preflight: the stage's export exists, nothing to train (stage.sh then skips torchrun)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepc.runtime", description="Train one stage of a compiled stepc run.")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--stage", required=True, type=int)
    for what in ALLOWABLE:
        parser.add_argument(f"--allow-{what}", action="store_true", help=f"proceed despite a {what.replace('-', ' ')}")
    parser.add_argument("--preflight", action="store_true",
                        help="only run the checks that need no torch (manifest, stage order) and exit: 0 to train, 2 a "
                             "refusal, 3 the stage is already complete; the stage scripts run this before torchrun, which "
                             "would turn the exit code 2 of a refusal into 1")
    parser.add_argument("--verify-data", action="store_true",
                        help="accepted for the stage scripts; `stepc data prepare --verify-data` (run by them) re-hashes "
                             "every data file and shard")
    parser.add_argument("--lock-pid", type=int,
                        help="with --preflight: take the run directory's lock for this process (the stage script)")
    parser.add_argument("--world", type=int, help="with --preflight: the number of ranks the stage will run on")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="with --preflight: the number of nodes (multi-node networking checks)")
    args = parser.parse_args(argv)
    allow = {what for what in ALLOWABLE if getattr(args, "allow_" + what.replace("-", "_"))}
    if args.preflight:
        from stepc.runlock import acquire

        try:
            if args.lock_pid is not None:  # before the checks: they may write (checkpoints/EXPERIMENT)
                acquire(args.manifest.parent, args.lock_pid, f"stage-{args.stage}.sh")
            _, complete = preflight(args.manifest, args.stage, allow, world=args.world, nnodes=args.nnodes)
        except (RuntimeFailure, UserError) as failure:
            print(f"error: {failure}", file=sys.stderr, flush=True)
            return 2
        return EXIT_COMPLETE if complete else 0
    _die_with_launcher()
    from stepc.runtime.loop import preempt

    preempt.install()  # before torch's imports: a stop signal during start-up is not lost
    from stepc.runtime.loop.console import quiet_library_bars_unless_tty

    quiet_library_bars_unless_tty()  # no carriage-return bars from transformers in SLURM logs
    from stepc.runtime.loop.train import main as train  # heavy imports after argument parsing

    try:
        return train(args.manifest, args.stage, allow)
    except (RuntimeFailure, UserError) as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        _record_failure(args.manifest.parent, args.stage, failure)
        return 2


def _record_failure(run_dir: Path, stage: int, failure: Exception) -> None:
    """FAILED for the stage script: torchrun reports any failed worker as exit code 1, so the diagnosed
    failure's exit code 2 (a CUDA OOM with the keys that fit, a non-finite loss, a full disk) reaches
    `stepc run` and run.sbatch only through this file. Any rank may write it (an OOM hits one rank)."""
    import json

    from stepc.atomic import atomic_write_text
    from stepc.rundir import RunDir

    record = {"exit_code": 2, "rank": int(os.environ.get("RANK", "0")), "error": str(failure)}
    path = RunDir(run_dir).failure_record(stage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError:
        pass  # a full or read-only disk: the stage script then reports torchrun's exit code


def _die_with_launcher() -> None:
    """Linux: have the kernel SIGKILL this worker when its torchrun agent dies.

    torchrun starts every worker in a session of its own, so `kill -9` of the stage script (or of
    its process group) kills only torchrun: the orphaned workers would go on training and writing
    checkpoints and exports into the run directory while a rerun resumes from the same files.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
