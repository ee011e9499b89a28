"""Predicted vs counted model-state bytes per stage for the paper's STEP specs (issue: memory truth).

For each spec and stage, the stage's real LlamaForCausalLM is built on the meta device (no memory),
old layers are frozen behind ReLoRA adapters exactly as the runtime does, and the trainable/frozen
parameters and tensors are counted. "counted" applies the runtime's byte costs to those counts
(16 B per trained parameter, 2 B per frozen bf16 parameter, 4 B per AdamW step scalar); it must
equal the compiler's `exact` prediction. The paper's Eq. 2 figure and reduction are shown beside it.

    python bench/memory.py            # prints a table, writes bench/results/memory.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepc.compiler.load import load_spec  # noqa: E402
from stepc.compiler.memory import STEP_SCALAR_BYTES, TRAINED_BYTES  # noqa: E402
from stepc.compiler.plan import make_plan  # noqa: E402
from stepc.runtime.model.lora import apply_adapters  # noqa: E402
from stepc.runtime.model.llama import llama_config  # noqa: E402

SPECS = ["paper-368m-step2", "paper-680m-step2", "paper-1.2b-step2", "paper-1.2b-step3",
         "paper-1.2b-step2-table1", "paper-1.2b-step3-table1"]
PAPER_REDUCTION = {"paper-368m-step2": 42.3, "paper-680m-step2": 42.2, "paper-1.2b-step3-table1": 53.9}


def counted_bytes(spec, total_layers: int, old_layers: int) -> int:
    """Bytes of the stage's model states from the parameters of a real (meta) model."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(spec.model, total_layers))
        apply_adapters(model, list(range(old_layers)), spec.step.lora_rank, spec.step.lora_alpha, None)
    frozen_bytes = 2 if spec.train.precision == "bf16" else 4
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return TRAINED_BYTES * trained + frozen_bytes * frozen + STEP_SCALAR_BYTES * tensors


def main() -> None:
    rows = []
    for name in SPECS:
        spec, _ = load_spec(ROOT / "specs" / f"{name}.toml")
        paper = make_plan(spec.model_copy(update={"memory": spec.memory.model_copy(update={"accounting": "paper"})}))
        exact_spec = spec.model_copy(update={"memory": spec.memory.model_copy(update={"accounting": "exact", "budget": None})})
        exact = make_plan(exact_spec)
        for ps, es in zip(paper.stages, exact.stages):
            counted = counted_bytes(spec, es.total_layers, es.frozen_layers)
            rows.append({
                "spec": name, "stage": es.index, "layers": f"{es.frozen_layers}+{es.new_layers}",
                "paper_eq2_bytes": ps.peak_bytes, "exact_predicted_bytes": es.exact_model_state_bytes,
                "counted_bytes": counted, "match": counted == es.exact_model_state_bytes,
            })
        rows.append({"spec": name, "stage": "peak", "layers": str(paper.layers),
                     "paper_eq2_bytes": paper.peak_bytes, "paper_vanilla_bytes": paper.vanilla_peak_bytes,
                     "reduction_pct": round(100 * paper.reduction, 1), "paper_reports_pct": PAPER_REDUCTION.get(name),
                     "exact_reduction_pct": round(100 * exact.reduction, 1)})
    print(f"{'spec':24} {'stage':>5} {'layers':>10} {'Eq.2 (GB)':>10} {'exact pred (GB)':>16} {'counted (GB)':>13} {'match':>5}")
    for r in rows:
        if r["stage"] == "peak":
            paper_pct = f" (paper: {r['paper_reports_pct']}%)" if r["paper_reports_pct"] else ""
            print(f"{r['spec']:24} {'peak':>5} {r.layers:>10} {r['paper_eq2_bytes'] / 1e9:10.3f}  vanilla "
                  f"{r['paper_vanilla_bytes'] / 1e9:.3f} GB, reduction {r['reduction_pct']}%{paper_pct}, exact accounting "
                  f"{r['exact_reduction_pct']}%")
        else:
            print(f"{r['spec']:24} {r['stage']:>5} {r.layers:>10} {r['paper_eq2_bytes'] / 1e9:10.3f} "
                  f"{r['exact_predicted_bytes'] / 1e9:16.3f} {r['counted_bytes'] / 1e9:13.3f} {str(r['match']):>5}")
    out = ROOT / "bench" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    if not all(r.get("match", True) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
