"""`stepc eval RUN_DIR`: perplexity of the exported model on the spec's validation sets, and
optionally lm-evaluation-harness tasks (the paper's Appendix G) on the same export.

Runs in one process on the best local device; writes RUN_DIR/eval.json atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.rundir import RunDir, atomic_write_json


def evaluate_run(run_dir: Path, tasks: list[str], include_path: Path | None, limit: int | None,
                 batch_size: int = 8) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from stepc.runtime.data import eval_sets, iter_eval_batches, open_datasets
    from stepc.runtime.metrics import loss_sums
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(run_dir)
    export = RunDir(run_dir).export
    if not (export / "EXPORT_COMPLETE").is_file():
        raise UserError("this run has no complete export yet", file=str(run_dir),
                        fix=f"finish training first (stepc run {run_dir}); the last stage writes {export}")
    spec = manifest.spec
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).to(device).eval()
    try:
        tok, train, named = open_datasets(spec.data, spec.model.seq_len, RunDir(run_dir).cache)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read the run's data: {exc}", file=str(run_dir),
                        fix="run from the directory the spec's data paths are relative to") from None
    _, sets = eval_sets(train, named, spec.data.holdout_fraction, spec.experiment.seed)
    result: dict[str, Any] = {"perplexity": {}, "tasks": {}}
    for name, (blocks, indices) in sets.items():
        total, count = loss_sums(model, iter_eval_batches(blocks, batch_size, 0, 1, spec.eval.max_tokens, indices), device).tolist()
        result["perplexity"][name] = math.exp(total / count)
    if tasks:
        result["tasks"] = _lm_eval(model, export, tasks, include_path, limit, batch_size, device)
    atomic_write_json(RunDir(run_dir).eval_result, result)
    return result


def _lm_eval(model, export: Path, tasks: list[str], include_path: Path | None, limit: int | None,
             batch_size: int, device: str) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed", key="--tasks",
                        fix="pip install 'stepc[lm-eval]' (or pip install lm-eval accelerate)") from None
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tasks must come from local files or a warm cache
    tokenizer = AutoTokenizer.from_pretrained(export)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def render(result: dict[str, Any]) -> str:
    lines = [f"perplexity {name}: {value:.3f}" for name, value in result["perplexity"].items()]
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "stderr" not in k)
        lines.append(f"{task}: {shown}")
    return "\n".join(lines)
