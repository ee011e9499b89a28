"""bench/gpu.py --smoke: the GPU benchmark's whole pipeline (prepare with the compiler, then the
runtime-only run of both STEP stages, the vanilla stage and the plain loop, each time-boxed) on a
tiny model on CPU, so the script that will produce the GPU figures is known to work before a GPU
is available. ~2 minutes on two idle cores (mostly process start-up)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, stage_env


def test_gpu_bench_smoke_writes_every_figure(tmp_path):
    bench = REPO / "bench" / "gpu.py"
    env = stage_env()
    prep = subprocess.run([sys.executable, str(bench), "--prepare", str(tmp_path / "b"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert (tmp_path / "b" / "runs" / "gpu-vanilla" / "data-index.json").is_file()  # tokenised at prepare time
    assert (tmp_path / "b" / ".cache" / "stepc").is_dir()  # the shards, carried with the bench directory
    run = subprocess.run([sys.executable, str(bench), "--run", str(tmp_path / "b"), "--out", str(tmp_path / "gpu.json")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    parts = result["parts"]
    assert set(parts) == {"step-1", "step-2", "vanilla-1", "plain"}
    for name, part in parts.items():
        assert part["ok"], (name, part.get("tail"))
        assert part["tokens_per_s"] > 0
    for name in ("step-1", "step-2", "vanilla-1"):
        assert parts[name]["steps_logged"] >= 1
        assert parts[name]["predicted_device_bytes"] > parts[name]["predicted_exact_model_state_bytes"] > 0
    assert parts["step-2"]["layers"] == parts["vanilla-1"]["layers"] == 2 * parts["step-1"]["layers"]
    assert result["runtime_over_plain"] > 0
    assert parts["plain"]["flash_attention_runtime_model"] is True  # the CPU flash kernel: no mask tensor
    assert result["device"] == "cpu" and parts["vanilla-1"]["mfu"] is None  # no GPU here: no MFU, no invented figure
