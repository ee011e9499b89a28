"""`python -m stepc.runtime --manifest RUN_DIR/manifest.json --stage I`: run by torchrun on every rank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepc.runtime.guard import ALLOWABLE, RuntimeFailure, preflight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepc.runtime", description="Train one stage of a compiled stepc run.")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--stage", required=True, type=int)
    for what in ALLOWABLE:
        parser.add_argument(f"--allow-{what}", action="store_true", help=f"proceed despite a {what.replace('-', ' ')}")
    parser.add_argument("--preflight", action="store_true",
                        help="only run the checks that need no torch (manifest, stage order) and exit; the stage scripts "
                             "run this before torchrun, which would turn the exit code 2 of a refusal into 1")
    args = parser.parse_args(argv)
    allow = {what for what in ALLOWABLE if getattr(args, "allow_" + what.replace("-", "_"))}
    if args.preflight:
        try:
            preflight(args.manifest, args.stage, allow)
        except RuntimeFailure as failure:
            print(f"error: {failure}", file=sys.stderr, flush=True)
            return 2
        return 0
    from stepc.runtime.train import main as train  # heavy imports after argument parsing

    try:
        return train(args.manifest, args.stage, allow)
    except RuntimeFailure as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
