"""`stepc eval RUN_DIR`: perplexity of the exported model on the spec's validation sets, and
optionally lm-evaluation-harness tasks (the paper's Appendix G) on the same export.

Runs in one process on the best local device; `save` writes RUN_DIR/eval.json atomically (the CLI
prints the numbers first, so a run directory that cannot take the file loses nothing).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.atomic import atomic_write_json
from stepc.rundir import manifest_path, RunDir


def evaluate_run(run_dir: Path, tasks: list[str], include_path: Path | None, limit: int | None,
                 batch_size: int = 8) -> dict[str, Any]:
    from stepc.runtime.model.export_seal import ExportDamaged
    from stepc.runtime.model.export_seal import check as check_export
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(run_dir)  # everything the user can get wrong is checked before torch loads
    run_dir = manifest_path(run_dir).parent  # RUN_DIR or RUN_DIR/manifest.json
    export = RunDir(run_dir).export
    if not (export / "EXPORT_COMPLETE").is_file():
        raise UserError("this run has no complete export yet", file=str(run_dir),
                        fix=f"finish training first (stepc run {run_dir}); the last stage writes {export}")
    try:
        check_export(export)
    except ExportDamaged as exc:
        raise UserError(f"the exported model is damaged: {exc}", file=str(export),
                        fix=f"move {export} aside and rerun the last stage (it re-exports from its last checkpoint)") from None
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"{include_path} is not a directory of task YAML files", key="--include-path",
                        fix="pass the directory that holds your lm-eval task .yaml files")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be a positive number of documents", key="--limit", fix="pass e.g. --limit 100")
    documents = manifest.spec.method.objective == "documents"  # method "sft" reads no [data]: no perplexity sets
    if not documents and not tasks:
        raise UserError(f"{manifest.spec.experiment.name} is an instruction-tuned run: it has no validation documents to "
                        "score perplexity on", file=str(run_dir), key="--tasks",
                        fix=f"pass lm-eval --tasks, or write its answers with "
                            f"`stepc generate {run_dir} --questions FILE --out FILE`")
    task_manager = _task_manager(tasks, include_path) if tasks else None

    from stepc.runtime.data.prepare import prepare

    if documents:
        prepare(manifest.spec.data, Path(manifest.spec.data.cache_dir), run_dir)  # quick when the stages prepared it

    from stepc.runtime.loop.console import quiet_library_bars_unless_tty

    quiet_library_bars_unless_tty()  # transformers' "Loading weights" bar is carriage returns in a log file
    import torch
    from transformers import AutoModelForCausalLM

    from stepc.runtime.data.prepared import open_prepared, training_sets
    from stepc.runtime.data.evalsets import iter_eval_batches
    from stepc.runtime.loop.metrics import loss_sums
    from stepc.runtime.loop.precision import compute_dtype

    spec = manifest.spec
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the runtime's eval dtype (bf16 on a GPU under precision = "bf16"), so the perplexities agree
    model = AutoModelForCausalLM.from_pretrained(export, dtype=compute_dtype(spec.train.precision, device)).to(device).eval()
    sets = {}
    if documents:
        _, sets = training_sets(open_prepared(run_dir, spec.data, spec.model.seq_len), spec.data.holdout_fraction,
                                spec.experiment.seed)
    result: dict[str, Any] = {"perplexity": {}, "tasks": {}}
    for name, (blocks, indices) in sets.items():
        total, count = loss_sums(model, iter_eval_batches(blocks, batch_size, 0, 1, spec.eval.max_tokens, indices),
                                 device).tolist()
        result["perplexity"][name] = math.exp(total / count)
    if tasks:
        result["tasks"] = _lm_eval(model, export, tasks, task_manager, limit, batch_size, device)
    return result


def save(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write RUN_DIR/eval.json; a run directory that cannot take it (read-only, full) is a UserError
    naming it, raised after the caller has shown the numbers, so the computation is not lost."""
    path = RunDir(manifest_path(run_dir).parent).eval_result
    try:
        atomic_write_json(path, result)
    except OSError as exc:
        raise UserError(f"the results above could not be saved: {exc.strerror}", file=str(path),
                        fix="make the run directory writable (or free space) and rerun `stepc eval`, "
                            "or copy the numbers above") from None
    return path


_MANAGERS: dict[str | None, Any] = {}


def _task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager, once every task name is known to it and its data loads offline (exit 2 otherwise).

    Loading a task's data is where an online-only task fails; doing it before the model loads turns that
    into one message naming the task instead of a traceback minutes later.
    """
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed", key="--tasks",
                        fix="pip install 'stepc[lm-eval]' (or pip install lm-eval accelerate)") from None
    import difflib

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tasks must come from local files or a warm cache
    key = str(include_path) if include_path else None
    if key not in _MANAGERS:  # indexing lm-eval's thousands of task files takes seconds to minutes: once per process
        _MANAGERS[key] = TaskManager(include_path=key)
    manager = _MANAGERS[key]
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown lm-eval task {task!r}{hint}", key="--tasks",
                            fix="`lm_eval ls tasks` lists them; local tasks need --include-path DIR")
    for task in tasks:
        try:
            get_task_dict([task], manager)
        except Exception as exc:  # noqa: BLE001 - datasets/hub raise many types when data is not available offline
            reason = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
            raise UserError(f"lm-eval task {task!r} cannot load its data offline ({reason})", key="--tasks",
                            fix="stepc eval runs offline: use a task whose data is local (--include-path) or already in "
                                "the Hugging Face datasets cache") from None
    return manager


def _lm_eval(model, export: Path, tasks: list[str], manager, limit: int | None,
             batch_size: int, device: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def render(result: dict[str, Any]) -> str:
    lines = [f"perplexity {name}: {value:.3f}" for name, value in result["perplexity"].items()]
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "stderr" not in k)
        lines.append(f"{task}: {shown}")
    return "\n".join(lines)
