"""stepc sweep: one run directory per grid point, one SLURM job array (run on a real one-node cluster).

The compile tests take seconds. The cluster test compiles a 2-point sweep of a tiny spec (4 layers
of width 64, 2 stages of 6 + 7 steps, 1 CPU rank each), submits it with `stepc submit SWEEP_DIR`
(both array tasks run at once on the 2-CPU test node, each in its own rendezvous port), waits for
both and runs `stepc report SWEEP_DIR`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import SlurmCluster, free_rdzv_base, slurm_available, slurm_cluster_fixture
except ImportError:  # --import-mode=importlib: tests/ is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from slurm_cluster import SlurmCluster, free_rdzv_base, slurm_available, slurm_cluster_fixture

from stepc.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "specs" / "tiny-cpu.toml"
NAMES = ["tiny-cpu-lr1e-3-lora_rank8", "tiny-cpu-lr1e-3-lora_rank16", "tiny-cpu-lr3e-4-lora_rank8", "tiny-cpu-lr3e-4-lora_rank16"]
GRID = ["--grid", "train.lr=1e-3,3e-4", "--grid", "step.lora_rank=8,16"]

needs_slurm = pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))
slurm_cluster = slurm_cluster_fixture(scope="module")


def test_one_run_directory_per_point_and_one_array(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["sweep", str(TINY), *GRID, "--set", "train.warmup_steps=10", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in NAMES) and "stepc submit" in shown
    sweep_dir = out / "tiny-cpu.sweep"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == NAMES
    assert record["grid"] == {"train.lr": [1e-3, 3e-4], "step.lora_rank": [8, 16]}
    ports = []
    for point in record["points"]:
        manifest = json.loads((out / point["name"] / "manifest.json").read_text())
        assert manifest["hash"] == point["manifest_hash"]
        spec = manifest["spec"]
        assert spec["experiment"]["name"] == point["name"]
        assert (spec["train"]["lr"], spec["step"]["lora_rank"]) == (point["values"]["train.lr"], point["values"]["step.lora_rank"])
        assert spec["train"]["warmup_steps"] == 10 and manifest["overrides"]["train.warmup_steps"] == 10
        assert manifest["overrides"]["train.lr"] == point["values"]["train.lr"]
        ports.append(spec["launch"]["rdzv_port"])
        assert main(["verify", str(out / point["name"])]) == 0
    assert len(set(ports)) == 1  # one base port: run.sbatch adds the (distinct) job id of each array task
    script = (sweep_dir / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3\n" in script and "#SBATCH --time=00:30:00" in script
    assert f"RUNS=({' '.join(NAMES)})" in script

    # the diff of two points is the grid values and what follows from them
    capsys.readouterr()
    assert main(["diff", str(out / NAMES[0]), str(out / NAMES[1])]) == 1
    spec_changes = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("spec.")]
    assert spec_changes == ["spec.experiment.name", "spec.step.lora_rank"]

    # deterministic: a forced recompile writes the same bytes; without --force nothing is touched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["sweep", str(TINY), *GRID, "--set", "train.warmup_steps=10", "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["sweep", str(TINY), *GRID, "--set", "train.warmup_steps=10", "--out", str(out), "--force"]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, words", [
    (["--grid", "train.lr=1e-3,abc"], ["sweep point tiny-cpu-lrabc", "[train.lr]", "--grid train.lr=abc"]),
    (["--grid", 'launch.slurm.time="00:10:00","00:20:00"'], ["different SLURM requests", "--time=00:20:00"]),
    (["--grid", "train.lr=1e-3", "--set", "train.lr=1"], ["set the same key"]),
    (["--grid", "train.lr=1e-3,1e-3"], ["given twice"]),
    (["--grid", "experiment.name=a,b"], ["cannot sweep experiment.name"]),
    (["--grid", "train.lr="], ["not KEY=V1,V2"]),
    ([], ["at least one --grid"]),
])
def test_bad_sweeps_are_user_errors_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "runs"
    assert main(["sweep", str(TINY), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not out.exists()


SPEC = """\
[experiment]
name = "sw"
seed = 7

[model]
hidden_size = 64
num_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 512
seq_len = 64

[memory]
layers = [2, 2]
accounting = "exact"

[step]
lora_rank = 4
relora_reset_every = 100
restart_warmup_steps = 2

[train]
reference_steps = 8
global_batch_tokens = 128
micro_batch_size = 2
lr = 3e-3
warmup_steps = 2
precision = "fp32"
checkpoint_every = 4

[data]
train = [{train}]
tokenizer = "bpe-512"

[eval]
every_steps = 1000
max_tokens = 2048

[launch]
nnodes = 1
nproc_per_node = 1
rdzv_port = {port}

[launch.slurm]
partition = "{partition}"
time = "00:10:00"
cpus_per_task = 1
gpus_per_node = 0
"""


def array_states(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """Array task id -> JobState (scontrol prints one line per task)."""
    result = cluster.run("scontrol", "-o", "show", "job", job_id, check=False)
    states = {}
    for line in result.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        states[fields.get("ArrayTaskId", "?")] = fields.get("JobState", "")
    return states


@needs_slurm
def test_sweep_runs_as_a_job_array_and_reports(slurm_cluster: SlurmCluster, small_corpus, tmp_path, monkeypatch, capsys):
    started = time.monotonic()
    root = tmp_path / "project"
    root.mkdir()
    spec = root / "sw.toml"
    spec.write_text(SPEC.format(train=json.dumps(str(small_corpus / "train" / "*.txt")), port=free_rdzv_base(),
                                partition=slurm_cluster.partition))
    monkeypatch.chdir(root)  # the project root: relative paths, sbatch's working directory
    assert main(["sweep", "sw.toml", "--grid", "train.lr=3e-3,1e-3"]) == 0
    sweep_dir = Path("runs/sw.sweep")
    names = [p["name"] for p in json.loads((sweep_dir / "sweep.json").read_text())["points"]]
    assert names == ["sw-lr3e-3", "sw-lr1e-3"]

    # the job inherits this environment (sbatch --export=ALL): this interpreter, this checkout, this cluster
    path = os.environ.get("PYTHONPATH")
    for key, value in {**slurm_cluster.env, "PYTHON": sys.executable,
                       "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert main(["submit", str(sweep_dir)]) == 0
    job_id = capsys.readouterr().out.split()[-1]
    deadline = time.monotonic() + 420
    while True:
        states = array_states(slurm_cluster, job_id)
        if len(states) == 2 and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()):
            break
        assert time.monotonic() < deadline, f"array {job_id} still {states}"
        time.sleep(1)
    assert not list(root.glob("slurm-*.out"))  # SLURM output goes under the sweep directory, never the project root
    outputs = {p.name: p.read_text(errors="replace")[-3000:] for p in (sweep_dir / "logs").glob("slurm-*.out")}
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}, outputs
    for index, name in enumerate(names):
        out = (sweep_dir / "logs" / f"slurm-sw-sweep-{job_id}_{index}.out").read_text()
        assert f"array task {index} of 2 runs {(root / 'runs' / name).resolve()}" in out, out
        run_dir = root / "runs" / name
        assert (run_dir / "export" / "model.safetensors").is_file()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records if r["event"] == "stage_end"] == [1, 2]

    assert main(["report", str(sweep_dir)]) == 0
    table = capsys.readouterr().out
    assert "| run | train.lr | method |" in table
    assert "| sw-lr3e-3 | 0.003 | step |" in table and "| sw-lr1e-3 | 0.001 | step |" in table
    assert (sweep_dir / "report" / "report.md").is_file() and (sweep_dir / "report" / "loss.png").is_file()
    print(f"sweep of 2 runs on the test cluster: {time.monotonic() - started:.0f} s wall")
