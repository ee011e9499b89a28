"""Will it fit: `stepc plan SPEC --gpu NAME | --gpu-memory SIZE` answers from the compiler's device accounting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stepc.cli import main
from stepc.compiler import plan_spec
from stepc.compiler.fit import GPUS, Headroom, _with, allowed_micro_batches, fit, stage_peak
from stepc.compiler.load import load_spec
from stepc.compiler.overrides import resolve
from stepc.compiler.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "specs" / "tiny-cpu.toml"
PAPER = REPO / "specs" / "paper-1.2b-step2.toml"


@pytest.mark.parametrize("path", [TINY, PAPER, REPO / "specs" / "paper-368m-vanilla.toml",
                                  REPO / "specs" / "paper-368m-galore.toml"])
def test_peaks_are_the_planners_device_accounting(path):
    """The same layout planned with memory.accounting = "device" has exactly these stage peaks (GaLore's
    too: its projected moments, plus the activations and buffers device accounting adds)."""
    spec, _ = load_spec(path)
    plan = make_plan(spec)
    pinned = [f"memory.layers={plan.layers}", 'memory.accounting="device"', "memory.budget=\"1000TB\""]
    if spec.memory.stages == "auto":
        pinned.append(f"memory.stages={len(plan.layers)}")
    _, device_plan = plan_spec(resolve(path, pinned)[0], str(path))
    results = fit(spec, plan, 10**18)
    assert [r.peak_bytes for r in results] == [s.peak_bytes for s in device_plan.stages]


NONE = Headroom(0.0, 0)  # the estimate alone, for the boundaries of the search


def test_boundaries_micro_batch_and_checkpointing():
    spec, _ = load_spec(TINY)
    plan = make_plan(spec)
    stage = plan.stages[-1]
    new, old = stage.new_layers, stage.frozen_layers
    peak = stage_peak(_with(spec), new, old)
    assert fit(spec, plan, peak, NONE)[-1].fits and not fit(spec, plan, peak - 1, NONE)[-1].fits

    sizes = allowed_micro_batches(spec)
    assert sizes and all(spec.train.global_batch_tokens % (spec.model.seq_len * 2 * m) == 0 for m in sizes)
    # a capacity just under micro batch 2's peak: the largest that fits is the one below it
    two = stage_peak(_with(spec, 2, False), new, old)
    r = fit(spec, plan, two - 1, NONE)[-1]
    assert r.max_micro_batch == 1 and not r.fits and r.verdict == "lower micro_batch_size to 1"
    assert stage_peak(_with(spec, 1, False), new, old) <= two - 1
    # exactly micro batch 2's peak: 1 and 2 fit, and 2, the largest, is the answer (spec's 4 does not)
    r = fit(spec, plan, two, NONE)[-1]
    assert r.max_micro_batch == 2 and not r.fits and r.verdict == "lower micro_batch_size to 2"
    # the same with activation checkpointing: exactly micro batch 2's peak with it
    two_ac = stage_peak(_with(spec, 2, True), new, old)
    assert stage_peak(_with(spec, 1, True), new, old) < two_ac < stage_peak(_with(spec, 4, True), new, old)
    assert fit(spec, plan, two_ac, NONE)[-1].max_micro_batch_ac == 2
    # between micro batch 1 with and without checkpointing: only activation checkpointing makes it fit
    with_ac, without = stage_peak(_with(spec, 1, True), new, old), stage_peak(_with(spec, 1, False), new, old)
    assert with_ac < without
    r = fit(spec, plan, with_ac, NONE)[-1]
    assert r.max_micro_batch is None and r.max_micro_batch_ac == 1 and "needs activation_checkpointing" in r.verdict
    r = fit(spec, plan, with_ac - 1, NONE)[-1]
    assert r.max_micro_batch_ac is None and r.verdict.startswith("does not fit")


def test_headroom_is_what_a_stage_needs_beyond_the_estimate(capsys):
    """A stage fits when estimate x (1 + slack) + overhead <= capacity, the micro-batch search included;
    the defaults are the measured ones and the CLI's flags replace them."""
    spec, _ = load_spec(TINY)
    plan = make_plan(spec)
    stage = plan.stages[-1]
    peak = stage_peak(_with(spec), stage.new_layers, stage.frozen_layers)
    room = Headroom(0.25, 1000)
    needed = math.ceil(peak * 5 / 4) + 1000
    assert fit(spec, plan, needed, room)[-1].fits and not fit(spec, plan, needed - 1, room)[-1].fits
    assert fit(spec, plan, needed - 1, room)[-1].max_micro_batch != spec.train.micro_batch_size
    assert main(["plan", str(TINY), "--gpu-memory", f"{needed}B", "--headroom", "25%", "--overhead", "1000B"]) == 0
    assert main(["plan", str(TINY), "--gpu-memory", f"{needed - 1}B", "--headroom", "0.25", "--overhead", "1000B"]) == 1
    assert "needs = estimate + 25% allocator slack" in capsys.readouterr().out
    assert main(["plan", str(TINY), "--gpu", "h100-80gb", "--headroom", "lots"]) == 2
    assert "--headroom 'lots'" in capsys.readouterr().err


def test_padding_is_named_as_a_speed_up(capsys):
    assert main(["plan", str(PAPER), "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "model.vocab_multiple_of = 128 (50257 -> 50304 rows)" in out and "5461 -> 5504" in out
    assert main(["plan", str(PAPER), "--gpu", "h100-80gb", "--set", "model.vocab_multiple_of=128",
                 "--set", "model.intermediate_multiple_of=64"]) == 0
    assert "speed-up" not in capsys.readouterr().out  # 5461 -> 5504 is a multiple of 64 and of 128


def test_cli_answers_with_exit_code_and_error_bound(capsys):
    assert main(["plan", str(PAPER), "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "will it fit on h100-80gb" in out and "error bound: the estimate is within 6.7% of the peak allocated" in out
    assert main(["plan", str(REPO / "specs" / "paper-1.2b-vanilla.toml"), "--gpu", "rtx4090-24gb"]) == 1
    out = capsys.readouterr().out
    assert " NO " in out and "lower micro_batch_size" in out
    assert main(["plan", str(TINY), "--gpu-memory", "40MB", "--set", "train.activation_checkpointing=true"]) == 1
    assert main(["plan", str(TINY), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots'" in capsys.readouterr().err
    assert main(["plan", str(TINY), "--gpu", "h100"]) == 2
    assert "h100-80gb" in capsys.readouterr().err


def test_gpu_table_is_ordered_by_name_and_plausible():
    for key, (name, capacity) in GPUS.items():
        marketed = int(key.rsplit("-", 1)[1].removesuffix("gb"))
        assert 0.85 * marketed * 1e9 < capacity <= marketed * 2**30, key  # usable is a little under the label


def test_explain_breaks_the_estimate_into_terms_that_add_up(capsys):
    """`--explain`: each stage's printed terms add up to its estimate (to the printed rounding), and the
    terms that make 1.2B at micro batch 8 need ~30 GB are named: activations and, under gradient
    accumulation, FSDP2's unsharded fp32 gradients."""
    vanilla = REPO / "specs" / "paper-1.2b-vanilla.toml"
    assert main(["plan", str(vanilla), "--gpu", "h100-80gb", "--explain"]) == 0
    out = capsys.readouterr().out
    stage = out[out.index("\nstage 1:"):]
    estimate = float(stage.split("estimate ", 1)[1].split(" GB", 1)[0])
    terms = [float(line.rsplit(None, 2)[-2]) for line in stage.splitlines()[1:] if line.startswith("  ") and
             not line.startswith("  +")]
    assert abs(sum(terms) - estimate) <= 0.0005 * (len(terms) + 1)
    assert "activations of 24 decoder layers" in stage and "unsharded fp32 gradients kept between micro-batches" in stage
    assert main(["plan", str(PAPER), "--gpu", "h100-80gb", "--explain", "--set", "train.activation_checkpointing=true"]) == 0
    assert "one layer recomputed in full" in capsys.readouterr().out
