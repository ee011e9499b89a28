"""The `stepc` command line: a thin layer over the compiler passes.

Exit codes: 0 ok, 1 differences (diff/verify) or a failed stage, 2 user error (one paragraph, no traceback),
130 `stepc run` interrupted (the stage checkpointed the step in flight; rerun to resume).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from stepc import __version__
from stepc.errors import UserError


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
    except BrokenPipeError:  # `stepc help-spec | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepc",
                                     description="Compile STEP pre-training specs into reproducible run directories.")
    parser.add_argument("--version", action="version", version=f"stepc {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="validate a spec, solve the stage layout, write runs/<name>/")
    p.add_argument("spec", help="the TOML spec")
    p.add_argument("--out", default="runs", type=_nonblank,
                   help="output root; the run directory is OUT/<experiment.name> (default: runs)")
    p.add_argument("--force", action="store_true", help="recompile an existing run directory (checkpoints and logs are kept)")
    _add_set(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="print the plan table of one or more specs; writes nothing")
    p.add_argument("specs", nargs="+", help="TOML specs (several are shown side by side)")
    _add_set(p, recorded=False)
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", type=_nonblank,
                     help="will it fit: per-GPU peak of every stage on this GPU, e.g. h100-80gb, a100-40gb, "
                          "rtx4090-24gb (exit 1 when a stage does not fit)")
    gpu.add_argument("--gpu-memory", type=_nonblank, help="will it fit on GPUs with this much memory, e.g. 80GB or 24GiB")
    p.add_argument("--headroom", help="with --gpu: allocator slack added to the estimate, e.g. 12%% (default: the measured 12%%)")
    p.add_argument("--overhead", help="with --gpu: memory outside the allocator (CUDA context, NCCL), e.g. 1.5GB (default)")
    p.add_argument("--explain", action="store_true", help="with --gpu: each stage's per-GPU estimate term by term")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="compile one run directory per grid point and a SLURM job array that runs them")
    p.add_argument("spec", help="the TOML spec every point starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its TOML values, e.g. --grid train.lr=1e-3,3e-4 "
                        "(repeatable: the points are the product)")
    _add_set(p)
    p.add_argument("--out", default="runs", type=_nonblank,
                   help="output root: run directories OUT/<name>-<key><value>..., the sweep OUT/<name>.sweep")
    p.add_argument("--force", action="store_true", help="recompile existing run directories (checkpoints and logs are kept)")
    p.add_argument("--max-parallel", type=int, help="run at most this many array tasks at once (sbatch --array=...%%N)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("diff", help="semantic diff of two manifests or run directories (exit 1 when they differ)")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("verify", help="recompile a run directory's spec and check every hash (exit 1 on mismatch)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="run a compiled run directory's stage scripts locally, in order (or a sweep "
                                   "directory's points, without SLURM)")
    p.add_argument("run_dir", help="a run directory, or a sweep directory (its points, each with its own lock; "
                                   "finished points are skipped)")
    p.add_argument("--stage", type=int, help="run only this stage")
    p.add_argument("--max-parallel", type=_positive_int, default=None,
                   help="with a sweep directory: run this many points at once (default 1; they share the CPUs)")
    # the stage refusals that name these flags reach the user through stepc run, so it takes them too
    for what in ("data-change", "version-change"):
        p.add_argument(f"--allow-{what}", action="store_true",
                       help=f"passed to every stage script: proceed despite a {what.replace('-', ' ')}")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a compiled run directory (or a sweep directory, as one job array) to SLURM "
                                      "(run from the project root)")
    p.add_argument("run_dir")
    p.add_argument("--chain", action="store_true", help="one job per stage, each --dependency=afterok on the previous one")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("eval", help="perplexity of a run's exported model (and lm-evaluation-harness tasks)")
    p.add_argument("run_dir")
    p.add_argument("--tasks", type=_nonblank, help="comma-separated lm-eval task names (needs the lm-eval extra)")
    p.add_argument("--include-path", type=_nonblank_path, help="directory of extra lm-eval task YAML files (e.g. local tasks)")
    p.add_argument("--limit", type=_positive_int, help="evaluate at most this many documents per task (a positive integer)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="one markdown table (peak memory, perplexity, tokens) and loss curves for several runs")
    p.add_argument("run_dirs", nargs="+",
                   help="run directories, or a sweep directory (its runs, with the swept values as columns)")
    p.add_argument("--out", type=_nonblank_path,
                   help="where report.md and loss.png go (default: runs/report, or SWEEP_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="an instruction-tuned run's answers to MT-Bench-style questions, in FastChat's "
                                        "answer format (question_id, model_id, choices[].turns)")
    p.add_argument("run_dir", help="a finished run with method = \"sft\"")
    p.add_argument("--questions", required=True, type=Path,
                   help="FastChat question.jsonl: {\"question_id\", \"turns\": [...]} per line")
    p.add_argument("--out", required=True, type=Path, help="the answer file to write (jsonl, replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="at most this many tokens per answer (default 1024; "
                                                                     "never past the model's seq_len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample at this temperature")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: the sampling seed (per question and turn)")
    p.add_argument("--model-id", help="model_id in the answers (default: the run's experiment name)")
    p.set_defaults(func=cmd_generate)

    from stepc.commands.data import add_parser as add_data_parser

    add_data_parser(sub)

    p = sub.add_parser("help-spec", help="list every spec key with its type, default and meaning")
    p.add_argument("section", nargs="?", help="only this table and its sub-tables, e.g. train or launch.slurm")
    p.set_defaults(func=cmd_help_spec)
    return parser


def _positive_int(text: str) -> int:
    """argparse type: a positive integer (argparse turns the ValueError into exit 2 and a usage line)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in its message


def _nonblank(text: str) -> str:
    """argparse type: an option given an empty or blank value is a mistake (`--gpu ""` used to skip the fit
    table silently), reported like any other bad value: exit 2 naming the option."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a value or leave the option out")
    return text


def _nonblank_path(text: str) -> Path:
    return Path(_nonblank(text))


def _add_set(p: argparse.ArgumentParser, recorded: bool = True) -> None:
    where = "recorded in the run directory's spec.toml and manifest" if recorded else "nothing is written"
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a spec key with a TOML value, e.g. --set train.lr=3e-4 (repeatable; {where})")


def _compile(path: str, sets: list[str] | None, emit: bool):
    """The spec file with --set values applied, planned (emit=False: (spec, plan)) or compiled (a Compiled).

    Errors say which --set they came from; a tracking backend the spec selects must be installed.
    """
    from stepc.compiler import compile_spec, plan_spec
    from stepc.compiler.overrides import blamed, recorded, resolve
    from stepc.schema.trackers import check_log

    text, overrides = resolve(path, sets)
    with blamed(overrides):
        result = compile_spec(text, path, recorded(overrides)) if emit else plan_spec(text, path)
    spec = result.spec if emit else result[0]
    check_log(spec.log, path)
    return result


def _warn(path: str, spec, plan) -> None:
    """Print what compiles but is probably a mistake (a validation set that is a training file...)."""
    from stepc.compiler.static_checks import warnings

    for key, message in warnings(spec, plan):
        print(f"warning: {path}: [{key}] {message}", file=sys.stderr)


def cmd_compile(args: argparse.Namespace) -> int:
    from stepc.compiler.emit import write_run_dir
    from stepc.compiler.plan_table import plan_summary, plan_table

    compiled = _compile(args.spec, args.sets, emit=True)
    spec, plan, manifest = compiled.spec, compiled.plan, compiled.manifest
    _warn(args.spec, spec, plan)
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
    from stepc.compiler.plan_table import compare_plans, plan_summary, plan_table

    plans, fits = [], True
    capacity = None
    if args.gpu is not None or args.gpu_memory is not None:  # "" is a mistake to report, not "no --gpu"
        from stepc.compiler.fit import explain, fit, fit_table, gpu_capacity, parse_headroom

        label, capacity = gpu_capacity(args.gpu, args.gpu_memory)
        headroom = parse_headroom(args.headroom, args.overhead)
    for i, path in enumerate(args.specs):
        spec, plan = _compile(path, args.sets, emit=False)
        _warn(path, spec, plan)
        if len(args.specs) > 1:
            print(("\n" if i else "") + f"== {path} ({spec.experiment.name})")
        print(plan_table(plan))
        print(plan_summary(plan))
        if capacity is not None:
            results = fit(spec, plan, capacity, headroom)
            print("\n" + fit_table(spec, results, label, headroom))
            if args.explain:
                print(explain(spec, plan, headroom))
            fits = fits and all(r.fits for r in results)
        plans.append((spec.experiment.name, plan))
    if len(plans) > 1:
        print("\n" + compare_plans(plans))
    return 0 if fits else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from stepc.commands.diff import diff, render
    from stepc.schema.manifest import read_manifest_json

    changes = diff(read_manifest_json(args.a), read_manifest_json(args.b))  # any two manifests, typed or not
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
    from stepc.rundir import manifest_path, RunDir
    from stepc.schema.manifest import load_manifest

    from stepc.commands.sweep import is_sweep_dir

    if is_sweep_dir(Path(args.run_dir)):
        if args.stage is not None or args.allow_data_change or args.allow_version_change:
            raise UserError("--stage and --allow-* apply to one run, not to a sweep", file=args.run_dir,
                            fix="run a point's run directory with them (stepc run RUN_DIR --stage N), or the sweep without them")
        from stepc.commands.sweep_local import run_sweep

        return run_sweep(Path(args.run_dir), args.max_parallel or 1)
    if args.max_parallel is not None:
        raise UserError("--max-parallel applies to a sweep directory", file=args.run_dir,
                        fix="drop --max-parallel (a run's stages run in order), or pass the sweep directory")
    manifest = load_manifest(args.run_dir)
    run_dir = manifest_path(args.run_dir).parent  # RUN_DIR or RUN_DIR/manifest.json
    indices = [s.index for s in manifest.plan.stages]
    if args.stage is not None:
        if args.stage not in indices:
            raise UserError(f"stage {args.stage} does not exist", file=str(run_dir), fix=f"choose one of {indices}")
        indices = [args.stage]
    from stepc.commands.run import run_stages

    allow = [f"--allow-{what}" for what in ("data-change", "version-change") if getattr(args, f"allow_{what.replace('-', '_')}")]
    code = run_stages(run_dir, manifest, indices, allow)  # lock, script hashes, Ctrl-C -> 130, refusals -> 2
    if code:
        return code
    paths = RunDir(run_dir)
    print(f"metrics: {paths.metrics}")
    if paths.export.is_dir():
        print(f"model:   {paths.export} (Hugging Face format: AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from stepc.commands.sweep import compile_sweep, write_sweep
    from stepc.compiler.plan_table import compare_plans

    if args.max_parallel is not None and args.max_parallel < 1:
        raise UserError("--max-parallel must be at least 1", fix="e.g. --max-parallel 4")
    base, points = compile_sweep(args.spec, args.grid, args.sets)
    sweep_dir = write_sweep(Path(args.out), base, points, args.force, args.max_parallel)
    print(compare_plans([(p.name, p.compiled.plan) for p in points]))
    print(f"wrote {len(points)} run directories and {sweep_dir}/; submit the job array with: stepc submit {sweep_dir}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from stepc.commands.submit import submit
    from stepc.commands.sweep import is_sweep_dir, submit_sweep

    if is_sweep_dir(Path(args.run_dir)):
        if args.chain:
            raise UserError("--chain applies to one run, not to a sweep's job array", file=args.run_dir,
                            fix="submit the sweep without --chain (each array task runs its stages in order)")
        print(f"submitted {args.run_dir}: job array {submit_sweep(Path(args.run_dir))}")
        return 0
    ids = submit(Path(args.run_dir), args.chain)
    print(f"submitted {args.run_dir}: job{'s' if len(ids) > 1 else ''} {' '.join(ids)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stepc.commands.evaluate import evaluate_run, render, save

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    result = evaluate_run(Path(args.run_dir), tasks, args.include_path, args.limit)
    print(render(result), flush=True)  # before saving: a run directory that cannot take eval.json loses nothing
    print(f"wrote {save(Path(args.run_dir), result)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from stepc.commands.generate import generate_answers

    records = generate_answers(Path(args.run_dir), args.questions, args.out, args.max_new_tokens, args.temperature,
                               args.seed, args.model_id)
    print(f"wrote {args.out}: answers to {len(records)} questions ({sum(len(r['choices'][0]['turns']) for r in records)} turns)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from stepc.commands.report import write_report
    from stepc.commands.sweep import columns, is_sweep_dir, run_dirs

    dirs, extra, out = [], {}, args.out
    for given in map(Path, args.run_dirs):
        if is_sweep_dir(given):  # a sweep: its runs that have metrics, the swept values as columns
            found = [d for d in run_dirs(given) if (d / "metrics.jsonl").is_file()]
            if len(found) < len(run_dirs(given)):
                print(f"note: {given}: {len(run_dirs(given)) - len(found)} of {len(run_dirs(given))} runs have no metrics yet")
            dirs += found
            extra.update(columns(given))
            out = out or given / "report"
        else:
            dirs.append(given)
    if not dirs:
        raise UserError("no run has metrics yet", file=args.run_dirs[0], fix="wait for the runs to train (squeue), then rerun")
    out = out or Path("runs/report")
    print(write_report(dirs, out, extra or None))
    print(f"wrote {out / 'report.md'} and {out / 'loss.png'}")
    return 0


def cmd_help_spec(args: argparse.Namespace) -> int:
    from stepc.schema.spec import Spec

    text = spec_reference(Spec).strip("\n")
    if args.section:
        section = args.section.strip("[] ")
        blocks = [b.strip("\n") for b in re.split(r"\n(?=\[)", text)]  # each starts with its "[table]" line
        names = [b[1:b.index("]")] for b in blocks]
        chosen = [b for b, n in zip(blocks, names) if n == section or n.startswith(section + ".")]
        if not chosen:
            raise UserError(f"no spec table [{section}]", fix=f"name one of: {', '.join(names)}")
        text = "\n\n".join(chosen)
    print(text)
    return 0


def _type_name(ann) -> str:
    """A field's type as a spec author writes it: int, float, string, bool, list of ..., one of "a" | "b"."""
    from typing import Literal, Union, get_args, get_origin

    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (", optional" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    if hasattr(ann, "__metadata__"):  # Annotated[int, Field(...)]
        return _type_name(args[0])
    if isinstance(ann, type) and hasattr(ann, "model_fields"):  # a pydantic section: a TOML table
        return "table"
    return {int: "int", float: "float", str: "string", bool: "bool"}.get(ann, getattr(ann, "__name__", str(ann)))


def spec_reference(model, prefix: str = "") -> str:
    """Every key with its type, default and docstring, generated from the pydantic models."""
    from typing import get_args, get_origin

    from pydantic import BaseModel

    def is_model(ann) -> bool:
        return isinstance(ann, type) and issubclass(ann, BaseModel)

    lines, tables = [], []  # sub-tables after the plain keys, as TOML requires
    for name, field in model.model_fields.items():
        ann = field.annotation
        optional = [a for a in get_args(ann) if a is not type(None)]
        if len(optional) == 1 and is_model(optional[0]) and len(get_args(ann)) == 2:  # an optional table, e.g. [sft]
            ann = optional[0]
        if is_model(ann):
            tables += [f"\n[{prefix}{name}]  {field.description or ''}", spec_reference(ann, f"{prefix}{name}.")]
            continue
        default = "(required)" if field.is_required() else repr(field.default)
        lines.append(f"  {name} = {default}    ({_type_name(ann)})\n      {field.description or ''}")
        # a table of named sub-tables (dict[str, Model], e.g. [data.sources.NAME]): list the sub-table's keys too
        if get_origin(ann) is dict and is_model(get_args(ann)[1]):
            entry = get_args(ann)[1]
            tables += [f"\n[{prefix}{name}.NAME]  one entry of {prefix}{name}", spec_reference(entry, f"{prefix}{name}.NAME.")]
    return "\n".join(lines + tables)


if __name__ == "__main__":
    sys.exit(main())
