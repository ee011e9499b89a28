"""`python -m stepc.runtime --manifest RUN_DIR/manifest.json --stage I`: run by torchrun on every rank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepc.runtime.guard import ALLOWABLE, RuntimeFailure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepc.runtime", description="Train one stage of a compiled stepc run.")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--stage", required=True, type=int)
    for what in ALLOWABLE:
        parser.add_argument(f"--allow-{what}", action="store_true", help=f"proceed despite a {what.replace('-', ' ')}")
    args = parser.parse_args(argv)
    allow = {what for what in ALLOWABLE if getattr(args, "allow_" + what.replace("-", "_"))}
    from stepc.runtime.train import main as train  # heavy imports after argument parsing

    try:
        return train(args.manifest, args.stage, allow)
    except RuntimeFailure as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
