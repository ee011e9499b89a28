"""The paper's baselines: ReLoRA's schedule, GaLore's optimizer wiring, `stepc eval` and `stepc report`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepc.compiler.load import parse_spec
from stepc.compiler.memory import exact_layer_params
from stepc.compiler.plan import make_plan
from stepc.schema.shapes import budget_flops_per_token
from stepc.runtime.loop.lr import is_merge_step, lr_at

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[experiment]
name = "{name}"
method = "{method}"
[model]
hidden_size = 64
num_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 512
seq_len = 64
[memory]
accounting = "exact"
[step]
lora_rank = 4
relora_reset_every = 10
restart_warmup_steps = 4
relora_warm_start_steps = 20
galore_rank = 8
[train]
reference_steps = {steps}
global_batch_tokens = 256
micro_batch_size = 4
warmup_steps = 2
precision = "fp32"
checkpoint_every = 100
[data]
train = ["{corpus}/train/*.txt"]
tokenizer = "bpe-512"
[data.validation]
val = "{corpus}/validation/*.txt"
[eval]
every_steps = 100
max_tokens = 2048
[launch]
nproc_per_node = 1
"""


def spec_for(method: str, steps: int = 100, corpus: Path = ROOT / "data" / "corpus", name: str | None = None) -> str:
    return BASE.format(name=name or f"m-{method}", method=method, steps=steps, corpus=corpus.as_posix())


def test_relora_plan_is_warm_start_then_lora_phase_at_equal_flops():
    spec = parse_spec(spec_for("relora"))
    plan = make_plan(spec)
    warm, lora = plan.stages
    assert (warm.new_layers, warm.frozen_layers, warm.steps) == (4, 0, 20)
    assert (lora.new_layers, lora.frozen_layers, lora.lr_offset, lora.data_step_offset) == (0, 4, 20, 20)
    P, E, fixed = exact_layer_params(spec)
    assert (warm.trainable_params, lora.trainable_params, lora.frozen_params) == (4 * P + fixed, 4 * E + fixed, 4 * P)
    budget = 6 * 4 * P * 100 * 256
    lora_step = budget_flops_per_token(4 * E, 4 * P, "paper") * 256
    assert lora.steps == (budget - 6 * 4 * P * 20 * 256) // lora_step
    assert warm.flops + lora.flops <= budget < warm.flops + lora.flops + lora_step
    assert plan.peak_bytes == plan.vanilla_peak_bytes  # the warm start is full-rank (the paper: equal to vanilla)
    assert lora.nominal_steps == warm.steps + lora.steps  # one cosine over the whole run


def test_relora_lr_restarts_are_jagged_and_continue_the_global_cosine():
    peak, warmup, total, reset, rewarm, start = 1e-3, 2, 200, 10, 4, 20
    lr = [lr_at(s, peak, warmup, total, 0.1, reset, rewarm, start) for s in range(total)]
    plain = [lr_at(s, peak, warmup, total, 0.1) for s in range(total)]
    assert lr[:start] == plain[:start]  # no restart during the full-rank warm start
    for restart in (20, 30, 40, 190):  # the switch to LoRA, then every merge
        assert is_merge_step(restart, reset, start) == (restart > start)
        for k in range(rewarm):
            assert lr[restart + k] == pytest.approx(plain[restart + k] * (k + 1) / rewarm)
        assert lr[restart + rewarm] == pytest.approx(plain[restart + rewarm])
    assert not is_merge_step(25, reset, start)


def test_galore_projects_exactly_the_decoder_layers_matrices():
    import galore_torch  # noqa: F401  (a test dependency: missing means failing, not skipping)

    from eager_reference import fresh_model
    from stepc.runtime.loop.setup import make_optimizer as _optimizer

    spec = parse_spec(spec_for("galore"))
    model = fresh_model(spec, 4, 0)
    optimizer = _optimizer(model, spec, torch.device("cpu"))
    assert type(optimizer).__module__.startswith("galore_torch")
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1
    group = projected[0]
    assert (group["rank"], group["update_proj_gap"], group["scale"]) == (8, 200, 0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in group["params"])
    want = sorted(n for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n)
    assert got == want and len(want) == 4 * 7
    others = [names[id(p)] for g in optimizer.param_groups if "rank" not in g for p in g["params"]]
    assert "model.embed_tokens.weight" in others and "lm_head.weight" in others
    assert all(".layers." not in n or n.endswith("layernorm.weight") for n in others)


def test_galore_needs_a_single_rank(tmp_path):
    from stepc.errors import UserError

    with pytest.raises(UserError) as err:
        parse_spec(spec_for("galore").replace("nproc_per_node = 1", "nproc_per_node = 2").replace("micro_batch_size = 4",
                                                                                                  "micro_batch_size = 2"))
    assert err.value.key == "launch.nproc_per_node"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_corpus):
    """A vanilla run of 8 steps on one rank: small, but a real torchrun stage and a real export."""
    out = tmp_path_factory.mktemp("methods")
    spec = out / "spec.toml"
    spec.write_text(spec_for("vanilla", steps=8, corpus=small_corpus, name="eval-run"))
    subprocess.run([sys.executable, "-m", "stepc.cli", "compile", str(spec), "--out", str(out)], check=True, capture_output=True)
    run_dir = out / "eval-run"
    subprocess.run(["bash", str(run_dir / "stage-1.sh")], check=True, capture_output=True, cwd=out,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return run_dir


def test_eval_reports_the_training_runs_final_perplexity(trained_run):
    result = subprocess.run([sys.executable, "-m", "stepc.cli", "eval", str(trained_run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((trained_run / "eval.json").read_text())
    last_eval = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line][-1]
    for name in ("heldout", "val"):  # same export, same blocks: the runtime's end-of-stage eval
        assert evaluation["perplexity"][name] == pytest.approx(last_eval[f"ppl_{name}"], rel=1e-3)


def test_eval_runs_a_local_lm_eval_task_offline(trained_run, tmp_path):
    import lm_eval  # noqa: F401  (a test dependency: missing means failing, not skipping)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"context": "To be, or not to", "choices": [" be", " cat", " seven"], "answer": 0},
            {"context": "My lord, I", "choices": [" will", " purple", " xylophone"], "answer": 0},
            {"context": "Thou art", "choices": [" a", " 42", " .,"], "answer": 1},
            {"context": "O Romeo, Romeo, wherefore art thou", "choices": [" Romeo", " table"], "answer": 0}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(f"""task: stepc_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.as_posix()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "stepc.cli", "eval", str(trained_run), "--tasks", "stepc_tiny_choice",
                             "--include-path", str(tasks)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    acc = json.loads((trained_run / "eval.json").read_text())["tasks"]["stepc_tiny_choice"]["acc,none"]

    # The same accuracy computed by hand: argmax over choices of the summed continuation log-likelihood.
    model = AutoModelForCausalLM.from_pretrained(trained_run / "export").eval()
    tok = AutoTokenizer.from_pretrained(trained_run / "export")
    correct = 0
    for row in rows:
        context = tok(row["context"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tok(row["context"] + choice)["input_ids"]
            cont = whole[len(context):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert acc == pytest.approx(correct / len(rows))


def test_report_table_has_one_row_per_run_with_plan_and_measured_peaks(trained_run, tmp_path):
    from stepc.commands.report import read_run, write_report

    from conftest import read_metrics

    from stepc.schema.units import format_bytes

    table = write_report([trained_run, trained_run], tmp_path / "report")
    run = read_run(trained_run)
    assert table.count("| eval-run |") == 2
    assert run["measured_peak_bytes"] == run["peak_bytes"]  # exact accounting, one rank: measured == predicted
    # report.md names each memory figure and shows the metrics file's bytes in the one unit (GB = 1e9 bytes)
    report = (tmp_path / "report" / "report.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("| ")]
    row = dict(zip(rows[0], rows[1]))
    train = [r for r in read_metrics(trained_run) if r["event"] == "train"]
    manifest = json.loads((trained_run / "manifest.json").read_text())
    figures = {"model state (plan)": manifest["plan"]["peak_bytes"],
               "model state (measured)": max(r["model_state_bytes"] for r in train),
               "process peak": max(r["peak_memory_bytes"] for r in train)}
    for column, value in figures.items():
        assert row[column] == format_bytes(value), (column, row)
        number, unit = row[column].split()
        assert unit == "GB" and abs(float(number) * 1e9 - value) <= 0.5e6, (column, row[column], value)  # 3 decimals of 1e9
    assert figures["process peak"] > 1e8  # an RSS of hundreds of MB: a GiB or MB unit would show in the digits above
    assert "Memory (GB = 10^9 bytes): model state = parameters + gradients + optimizer state" in report
    assert "process peak = rank 0's peak memory (CUDA max allocated on a GPU, peak RSS on a CPU)" in report
    assert (tmp_path / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert math.isfinite(run["perplexity"]["heldout"])
