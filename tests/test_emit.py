"""The emit pass and the commands around it: determinism, --force, the manifest, verify, diff, plan,
and shell safety of the emitted scripts (quoting, no injection from spec strings or paths)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stepc.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "specs" / "tiny-cpu.toml"
NAME = "tiny-cpu"
STAGE_KEYS = {"index", "new_layers", "total_layers", "trainable_params", "frozen_params", "peak_bytes", "steps",
              "tokens", "flops"}


def compile_spec(spec: Path, out: Path, *extra: str) -> int:
    return main(["compile", str(spec), "--out", str(out), *extra])


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def canonical_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def run_dir(tmp_path, capsys) -> Path:
    assert compile_spec(TINY, tmp_path / "runs") == 0
    capsys.readouterr()
    return tmp_path / "runs" / NAME


# ----------------------------------------------------------------------------- determinism and --force


def test_compile_twice_is_byte_identical(tmp_path, capsys):
    # the second compile reads a copy of the spec from elsewhere: no spec path may leak into the output
    other = tmp_path / "elsewhere" / "copy.toml"
    other.parent.mkdir()
    shutil.copy(TINY, other)
    assert compile_spec(TINY, tmp_path / "a") == 0
    assert compile_spec(other, tmp_path / "b") == 0
    a, b = files_of(tmp_path / "a" / NAME), files_of(tmp_path / "b" / NAME)
    assert {"manifest.json", "spec.toml", "plan.md", "memory.png", "stage-1.sh", "stage-2.sh", "run.sbatch"} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between two compiles"
    assert a["memory.png"].startswith(b"\x89PNG")
    assert str(tmp_path).encode() not in a["manifest.json"]


def test_existing_run_dir_needs_force_and_keeps_checkpoints(run_dir, capsys):
    out = run_dir.parent
    (run_dir / "checkpoints" / "stage-1").mkdir(parents=True)
    (run_dir / "checkpoints" / "stage-1" / "model.bin").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "stage-1.sh").write_text("edited\n")

    assert compile_spec(TINY, out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert (run_dir / "stage-1.sh").read_text() == "edited\n"  # nothing touched without --force

    assert compile_spec(TINY, out, "--force") == 0
    assert (run_dir / "checkpoints" / "stage-1" / "model.bin").read_bytes() == b"weights"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run_dir / "stage-1.sh").read_text() != "edited\n"
    assert main(["verify", str(run_dir)]) == 0


def test_force_with_fewer_stages_removes_stale_scripts(run_dir, tmp_path, capsys):
    one_stage = tmp_path / "one.toml"
    one_stage.write_text(TINY.read_text().replace("stages = 2", "stages = 1"))
    assert compile_spec(one_stage, run_dir.parent, "--force") == 0
    assert (run_dir / "stage-1.sh").exists() and not (run_dir / "stage-2.sh").exists()
    assert main(["verify", str(run_dir)]) == 0


# ----------------------------------------------------------------------------- the manifest


def test_manifest_has_the_design_keys_and_a_valid_hash(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["schema"] == 1
    assert isinstance(manifest["stepc_version"], str) and manifest["stepc_version"]
    assert manifest["hash"] == canonical_hash(manifest)
    assert manifest["spec"]["experiment"]["name"] == NAME
    assert manifest["spec"]["model"]["intermediate_size"] == round(8 / 3 * 128)  # defaults filled in
    plan = manifest["plan"]
    assert {"accounting", "solver", "vanilla_peak_bytes", "peak_bytes", "stages"} <= set(plan)
    assert plan["accounting"] == "exact" and plan["solver"] == "glpk"
    assert len(plan["stages"]) == 2
    for i, stage in enumerate(plan["stages"], start=1):
        assert STAGE_KEYS <= set(stage) and stage["index"] == i
    assert plan["stages"][-1]["total_layers"] == 6
    assert plan["peak_bytes"] == max(s["peak_bytes"] for s in plan["stages"]) <= manifest["spec"]["memory"]["budget"]
    assert {"python", "torch", "transformers", "pyomo", "glpk"} <= set(manifest["environment"])
    files = files_of(run_dir)
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert digest == "sha256:" + hashlib.sha256(files[name]).hexdigest()


# ----------------------------------------------------------------------------- stepc verify


def test_verify_passes_on_a_fresh_run_dir(run_dir, capsys):
    assert main(["verify", str(run_dir)]) == 0
    assert "verified" in capsys.readouterr().out


def test_verify_fails_after_editing_any_file_the_manifest_lists(run_dir, capsys):
    """Every file of the manifest's `files` (not a hand-picked few: memory.png, spec.toml included),
    changed by one appended byte, fails verify naming it; restored, the directory verifies again."""
    names = sorted(json.loads((run_dir / "manifest.json").read_text())["files"])
    assert {"memory.png", "plan.md", "spec.toml", "run.sbatch", "stage-1.sh", "stage-2.sh"} <= set(names)
    for name in names:
        original = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(original + b"\n")
        assert main(["verify", str(run_dir)]) == 1, name
        out = capsys.readouterr().out
        assert f"{name}: content differs" in out and "FAILED" in out, (name, out)
        (run_dir / name).write_bytes(original)
    assert main(["verify", str(run_dir)]) == 0


def test_verify_fails_after_editing_the_manifest(run_dir, capsys):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["plan"]["stages"][0]["steps"] += 1
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "manifest.json: content hash mismatch" in out


def test_verify_fails_on_a_forged_manifest_with_a_matching_hash(run_dir, capsys):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["plan"]["stages"][0]["steps"] += 1
    manifest["hash"] = canonical_hash(manifest)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "content hash mismatch" not in out
    assert "plan.stages[0].steps" in out


def test_verify_fails_after_editing_the_embedded_spec(run_dir, capsys):
    spec = run_dir / "spec.toml"
    spec.write_text(spec.read_text().replace("seed = 42", "seed = 43"))
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "spec.toml: content differs" in out and "spec.experiment.seed" in out


# ----------------------------------------------------------------------------- stepc diff


def test_diff_identical(run_dir, tmp_path, capsys):
    assert compile_spec(TINY, tmp_path / "again") == 0
    capsys.readouterr()
    assert main(["diff", str(run_dir), str(tmp_path / "again" / NAME)]) == 0
    assert capsys.readouterr().out.strip() == "identical"


def test_diff_names_changed_spec_fields(run_dir, tmp_path, capsys):
    bigger = tmp_path / "bigger.toml"
    bigger.write_text(TINY.read_text().replace("num_layers = 6", "num_layers = 8").replace('budget = "40MB"', 'budget = "60MB"'))
    assert compile_spec(bigger, tmp_path / "other") == 0
    capsys.readouterr()
    assert main(["diff", str(run_dir / "manifest.json"), str(tmp_path / "other" / NAME)]) == 1
    out = capsys.readouterr().out
    assert "spec.model.num_layers: 6 -> 8" in out
    assert "spec.memory.budget: 40000000 -> 60000000" in out
    assert "plan.vanilla_peak_bytes:" in out
    assert "environment" not in out


def test_diff_reports_environment_only_changes_apart(run_dir, tmp_path, capsys):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["environment"]["torch"] = "0.0.1-other"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(manifest))
    assert main(["diff", str(run_dir), str(other)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("environment (versions; the experiment itself is the same")
    assert any(line.strip().startswith("environment.torch:") and "0.0.1-other" in line for line in lines)
    assert not any(line.startswith(("spec.", "plan.", "files.")) for line in lines)


def test_diff_of_a_missing_manifest_is_a_user_error(tmp_path, capsys):
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "no manifest here" in err and "fix:" in err


# ----------------------------------------------------------------------------- stepc plan


def test_plan_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["plan", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before == []
    assert "vanilla" in out and "layout [" in out


# ----------------------------------------------------------------------------- shell safety

NASTY = "it's \"quoted\" $(touch pwned) `touch pwned` ${HOME}"


def nasty_spec(tmp_path: Path) -> Path:
    text = TINY.read_text()
    text = text.replace('train = ["data/corpus/train/*.txt"]', f"train = [{json.dumps('data/' + NASTY + '/*.txt')}]")
    text = text.replace('milton = "data/corpus/validation/*.txt"', f"milton = {json.dumps(NASTY + '.txt')}")
    text = text.replace('partition = "debug"', f"partition = {json.dumps('debug ' + NASTY)}\n"
                                               f"account = {json.dumps('acct; touch pwned')}\n"
                                               f"qos = {json.dumps(NASTY)}\n"
                                               f"extra = [{json.dumps('--comment=' + NASTY)}]")
    spec = tmp_path / "nasty.toml"
    spec.write_text(text)
    return spec


def weird_out(tmp_path: Path) -> Path:
    """An output root whose path has spaces, both quotes, $( ), backticks and a dollar."""
    return tmp_path / "out dir 'single' \"double\" $(touch pwned) `touch pwned` $HOME"


def scripts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("stage-*.sh")) + [run_dir / "run.sbatch"]


def no_pwned(*roots: Path) -> None:
    for root in roots:
        assert not list(root.rglob("pwned")), f"a command was injected under {root}"


@pytest.fixture(params=["tiny", "nasty"])
def emitted(request, tmp_path, capsys) -> Path:
    spec = TINY if request.param == "tiny" else nasty_spec(tmp_path)
    out = weird_out(tmp_path) if request.param == "nasty" else tmp_path / "runs"
    assert compile_spec(spec, out) == 0
    capsys.readouterr()
    return out / NAME


def test_scripts_pass_bash_n(emitted, tmp_path):
    for script in scripts(emitted):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    no_pwned(tmp_path)


def test_scripts_pass_shellcheck(emitted):
    assert shutil.which("shellcheck"), "shellcheck is missing: bash scripts/setup.sh installs it (apt-get install shellcheck)"
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts(emitted))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nasty_strings_stay_in_comments_and_the_manifest(tmp_path, capsys):
    out = weird_out(tmp_path)
    assert compile_spec(nasty_spec(tmp_path), out) == 0
    run_dir = out / NAME
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["spec"]["data"]["train"] == ["data/" + NASTY + "/*.txt"]  # arrives intact for the runtime
    sbatch = (run_dir / "run.sbatch").read_text()
    for line in sbatch.splitlines():
        if "pwned" in line:
            assert line.startswith("#SBATCH "), f"spec text outside an #SBATCH comment: {line!r}"
    assert "pwned" not in "".join(p.read_text() for p in run_dir.glob("stage-*.sh"))  # data paths never reach a script


def test_stage_script_passes_the_manifest_path_intact(tmp_path, capsys):
    """Run the stage script with PYTHON=echo: it prints its torchrun command instead of training."""
    out = weird_out(tmp_path)
    assert compile_spec(nasty_spec(tmp_path), out) == 0
    run_dir = (out / NAME).resolve()
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**os.environ, "PYTHON": "echo"}
    env.pop("RDZV_ENDPOINT", None)
    for index in (1, 2):
        result = subprocess.run(["bash", str(run_dir / f"stage-{index}.sh"), "--extra arg"], capture_output=True,
                                text=True, cwd=workdir, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        prepare, printed = result.stdout.strip().splitlines()  # PYTHON=echo: the data preparation, then torchrun
        assert prepare == f"-m stepc.cli data prepare {run_dir} --quiet"
        assert printed.startswith("-m stepc.runtime.launch --nnodes=1 --nproc_per_node=2 --standalone")
        assert printed.endswith(f"-m stepc.runtime --manifest {run_dir}/manifest.json --stage {index} --extra arg")
    assert (run_dir / "logs").is_dir()
    no_pwned(tmp_path)


def test_sbatch_runs_every_stage_with_a_fake_slurm(tmp_path, capsys):
    """run.sbatch under stand-in scontrol/srun: every stage starts, in order, with a c10d rendezvous."""
    out = weird_out(tmp_path)
    assert compile_spec(nasty_spec(tmp_path), out) == 0
    run_dir = (out / NAME).resolve()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && echo node-a && echo node-b\n')
    # srun: drop its own options, then run the command (bash stage-N.sh) as one task would
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "echo", "STEPC_RUN_DIR": str(run_dir),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "node-a"}
    result = subprocess.run(["bash", str(run_dir / "run.sbatch")], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    for index in (1, 2):
        log = (run_dir / "logs" / f"stage-{index}.slurm.log").read_text()
        # port = rdzv_port + job id mod rdzv_ports; this task runs on the head node, which hosts the store
        assert (f"--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=node-a:29577 "
                f"--rdzv_id=stepc-77-stage-{index} --rdzv_conf=is_host=1 -m stepc.runtime") in log
        assert "--node_rank" not in log
        assert f"--manifest {run_dir}/manifest.json --stage {index}" in log
    no_pwned(tmp_path)
