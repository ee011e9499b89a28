"""`stepc data prepare SPEC|RUN_DIR`: tokenise the spec's data into the shared shard cache.

Given a run directory it also writes RUN_DIR/data-index.json, which the training processes read;
the stage scripts, `stepc run` and run.sbatch run it before torchrun. Given a spec it only fills
the cache (e.g. on a CPU node ahead of the GPU job).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stepc.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data preparation (tokenise once into memory-mapped token shards)")
    data_sub = p.add_subparsers(required=True, metavar="ACTION")
    q = data_sub.add_parser("prepare", help="tokenise a spec's or run directory's data files into the shard cache "
                                            "(resumable, incremental; run automatically before every stage)")
    q.add_argument("target", help="a TOML spec, or a run directory (then RUN_DIR/data-index.json is written too)")
    q.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: every CPU this process may use)")
    q.add_argument("--verify-data", action="store_true",
                   help="re-hash every data file and shard instead of trusting sizes and modification times")
    q.add_argument("--quiet", action="store_true", help="print nothing when the data is already prepared")
    q.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from stepc.runtime.data.prepare import prepare

    target = Path(args.target)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}", key="--workers", fix="pass --workers 1 or more")
    if target.is_dir():
        from stepc.schema.manifest import load_manifest

        spec = load_manifest(target).spec
        run_dir: Path | None = target
    else:
        from stepc.compiler.load import load_spec

        spec, _ = load_spec(target)
        run_dir = None
    data = spec.data
    started = time.monotonic()
    lines: list[str] = []

    bar = UnitsBar(sys.stderr)

    def progress(line: str) -> None:
        lines.append(line)
        if bar.active:
            bar.write(line)  # above the bar, not through it
        else:
            print(line, file=sys.stderr, flush=True)

    if spec.method.objective == "instructions":  # [sft] train, with init_from's tokenizer (recorded in the plan)
        return _prepare_instructions(target, run_dir, spec, args.quiet, lines, progress, started)

    try:
        index = prepare(data, Path(data.cache_dir), run_dir, args.workers, args.verify_data, progress, spec.model.seq_len,
                        on_unit=bar)
    finally:
        bar.close()
    if lines or not args.quiet:
        for kind, by_name in index.datasets().items():
            for name, entry in by_name.items():
                print(f"{kind} {name}: {len(entry.files)} file(s), {entry.documents} documents, "
                      f"{entry.tokens} tokens ({index.dtype})")
        where = f"; index {run_dir / 'data-index.json'}" if run_dir else ""
        print(f"data prepared in {time.monotonic() - started:.1f} s (cache {data.cache_dir}{where})")
    return 0


class UnitsBar:
    """The tokenising progress: one tqdm bar on a terminal; elsewhere (logs, pipes) nothing per unit,
    since the lines before and after ("preparing N file(s)...", the datasets, "data prepared in")
    already say what was done and how long it took."""

    def __init__(self, stream) -> None:
        self.stream, self.bar = stream, None

    @property
    def active(self) -> bool:
        return self.bar is not None

    def __call__(self, done: int, total: int) -> None:
        if not self.stream.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, desc="tokenising", unit="unit", dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        self.bar.write(line, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _prepare_instructions(target: Path, run_dir: Path | None, spec, quiet: bool, lines: list[str], progress,
                          started: float) -> int:
    """Method "sft": check and tokenise [sft] train (RUN_DIR/instructions/ for a run directory)."""
    from stepc.compiler import plan_spec
    from stepc.compiler.load import read_spec_text
    from stepc.runtime.data.instructions import prepare as prepare_instructions
    from stepc.schema.manifest import load_manifest

    # a spec is planned as `stepc compile` would, so its init_from and data are checked the same way
    plan = load_manifest(run_dir).plan if run_dir is not None else plan_spec(read_spec_text(target), str(target), strict=True)[1]
    index = prepare_instructions(run_dir, spec, plan, progress)
    if lines or not quiet:
        print(f"instructions: {index['examples']} examples, {index['tokens']} tokens ({index['response_tokens']} in "
              f"responses), longest {index['longest']} of seq_len {spec.model.seq_len}")
        where = f"; {run_dir / 'instructions'}" if run_dir else ""
        print(f"data prepared in {time.monotonic() - started:.1f} s{where}")
    return 0
