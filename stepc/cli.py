"""The `stepc` command line: a thin layer over the compiler passes.

Exit codes: 0 ok, 1 differences (diff/verify) or a failed stage, 2 user error (one paragraph, no traceback),
130 `stepc run` interrupted (the stage checkpointed the step in flight; rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepc import __version__
from stepc.errors import UserError

DEFAULT_SPEC = "specs/tiny-cpu.toml"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepc", description="Compile STEP pre-training specs into reproducible run directories.")
    parser.add_argument("--version", action="version", version=f"stepc {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="validate a spec, solve the stage layout, write runs/<name>/")
    p.add_argument("spec", help="the TOML spec")
    p.add_argument("--out", default="runs", help="output root; the run directory is OUT/<experiment.name> (default: runs)")
    p.add_argument("--force", action="store_true", help="recompile an existing run directory (checkpoints and logs are kept)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="print the plan table of one or more specs; writes nothing")
    p.add_argument("specs", nargs="+", help="TOML specs (several are shown side by side)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("diff", help="semantic diff of two manifests or run directories (exit 1 when they differ)")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("verify", help="recompile a run directory's spec and check every hash (exit 1 on mismatch)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="run a compiled run directory's stage scripts locally, in order")
    p.add_argument("run_dir")
    p.add_argument("--stage", type=int, help="run only this stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a compiled run directory to SLURM (run from the project root)")
    p.add_argument("run_dir")
    p.add_argument("--chain", action="store_true", help="one job per stage, each --dependency=afterok on the previous one")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("eval", help="perplexity of a run's exported model (and lm-evaluation-harness tasks)")
    p.add_argument("run_dir")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (needs the lm-eval extra)")
    p.add_argument("--include-path", type=Path, help="directory of extra lm-eval task YAML files (e.g. local tasks)")
    p.add_argument("--limit", type=int, help="evaluate at most this many documents per task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="one markdown table (peak memory, perplexity, tokens) and loss curves for several runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="where report.md and loss.png go (default: runs/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("help-spec", help="list every spec key with its default and meaning")
    p.set_defaults(func=cmd_help_spec)
    return parser


def _read_spec(path: str) -> str:
    from stepc.compiler.load import read_spec_text

    return read_spec_text(path)


def cmd_compile(args: argparse.Namespace) -> int:
    from stepc.compiler import compile_spec
    from stepc.compiler.emit import write_run_dir
    from stepc.compiler.plan_table import plan_summary, plan_table

    compiled = compile_spec(_read_spec(args.spec), args.spec)
    spec, plan, manifest = compiled.spec, compiled.plan, compiled.manifest
    run_dir = Path(args.out) / spec.experiment.name
    try:
        write_run_dir(run_dir, compiled.files, args.force)
    except UserError as err:
        err.file = err.file or args.spec
        raise
    print(plan_table(plan))
    print(plan_summary(plan))
    print(f"wrote {run_dir}/ ({manifest['hash'][:19]}); run it with: stepc run {run_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from stepc.compiler import plan_spec
    from stepc.compiler.plan_table import compare_plans, plan_summary, plan_table

    plans = []
    for i, path in enumerate(args.specs):
        spec, plan = plan_spec(_read_spec(path), path)
        if len(args.specs) > 1:
            print(("\n" if i else "") + f"== {path} ({spec.experiment.name})")
        print(plan_table(plan))
        print(plan_summary(plan))
        plans.append((spec.experiment.name, plan))
    if len(plans) > 1:
        print("\n" + compare_plans(plans))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from stepc.commands.diff import diff, render
    from stepc.rundir import read_manifest

    changes = diff(read_manifest(args.a), read_manifest(args.b))
    print(render(changes))
    return 1 if changes else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from stepc.commands.verify import verify_run_dir

    notes: list[str] = []
    problems = verify_run_dir(Path(args.run_dir), notes)
    for line in problems + notes:
        print(line)
    print(f"{args.run_dir}: {'FAILED' if problems else 'verified'}")
    return 1 if problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from stepc.rundir import RunDir
    from stepc.schema.manifest import load_manifest

    run_dir = Path(args.run_dir)
    manifest = load_manifest(run_dir)
    indices = [s.index for s in manifest.plan.stages]
    if args.stage is not None:
        if args.stage not in indices:
            raise UserError(f"stage {args.stage} does not exist", file=str(run_dir), fix=f"choose one of {indices}")
        indices = [args.stage]
    from stepc.commands.run import run_stages

    code = run_stages(run_dir, manifest, indices)  # lock, script hashes, Ctrl-C -> 130, refusals -> 2
    if code:
        return code
    paths = RunDir(run_dir)
    print(f"metrics: {paths.metrics}")
    if paths.export.is_dir():
        print(f"model:   {paths.export} (Hugging Face format: AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from stepc.commands.submit import submit

    ids = submit(Path(args.run_dir), args.chain)
    print(f"submitted {args.run_dir}: job{'s' if len(ids) > 1 else ''} {' '.join(ids)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stepc.commands.evaluate import evaluate_run, render

    tasks = [t for t in args.tasks.split(",") if t]
    result = evaluate_run(Path(args.run_dir), tasks, args.include_path, args.limit)
    print(render(result))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from stepc.commands.report import write_report

    print(write_report([Path(d) for d in args.run_dirs], args.out))
    print(f"wrote {args.out / 'report.md'} and {args.out / 'loss.png'}")
    return 0


def cmd_help_spec(args: argparse.Namespace) -> int:
    from stepc.schema.spec import Spec

    print(spec_reference(Spec))
    return 0


def spec_reference(model, prefix: str = "") -> str:
    """Every key with its default and docstring, generated from the pydantic models."""
    from pydantic import BaseModel

    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"\n[{prefix}{name}]  {field.description or ''}")
            lines.append(spec_reference(ann, f"{prefix}{name}."))
        else:
            default = "(required)" if field.is_required() else repr(field.default)
            lines.append(f"  {name} = {default}\n      {field.description or ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
