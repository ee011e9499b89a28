"""stepc sweep: one run directory per grid point, one SLURM job array (run on a real one-node cluster).

The compile tests take seconds. The cluster test compiles a 2-point sweep of a tiny spec (4 layers
of width 64, 2 stages of 6 + 7 steps, 1 CPU rank each), submits it with `stepc submit SWEEP_DIR`
(both array tasks run at once on the 2-CPU test node, each in its own rendezvous port), waits for
both and runs `stepc report SWEEP_DIR`.
"""

from __future__ import annotations

import json
import os
import re
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
        assert (spec["train"]["lr"], spec["step"]["lora_rank"]) == (point["values"]["train.lr"],
                                                                    point["values"]["step.lora_rank"])
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


def test_values_that_make_the_same_run_name_are_refused_before_anything_is_compiled(tmp_path, capsys, monkeypatch):
    """Names keep lower-case letters, digits, '.', '_' and '-': GPU and gpu would share one run directory."""
    import stepc.commands.sweep as sweep

    compiled = []
    monkeypatch.setattr(sweep, "compile_spec", lambda *a, **k: compiled.append(a) or pytest.fail("compiled a point"))
    out = tmp_path / "runs"
    assert main(["sweep", str(TINY), "--grid", "launch.slurm.partition=GPU,gpu", "--grid", "train.lr=1e-3,3e-4",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {TINY}: [launch.slurm.partition]: two grid points get the same run name 'tiny-cpu-partitiongpu-lr1e-3' " \
           "(launch.slurm.partition = GPU and gpu)" in err and "fix:" in err, err
    assert not out.exists() and not compiled


def test_grid_keys_with_the_same_last_component_are_named_by_their_whole_key(tmp_path, capsys):
    spec = tmp_path / "blend.toml"
    spec.write_text(TINY.read_text().replace('train = ["data/corpus/train/*.txt"]\n', "")
                    + '[data.sources.plays]\nfiles = ["data/corpus/train/*.txt"]\n'
                    + '[data.sources.more]\nfiles = ["data/corpus/validation/*.txt"]\n')
    out = tmp_path / "runs"
    assert main(["sweep", str(spec), "--grid", "data.sources.plays.weight=1,2", "--grid", "data.sources.more.weight=1,3",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    names = [p["name"] for p in json.loads((out / "tiny-cpu.sweep" / "sweep.json").read_text())["points"]]
    assert names == ["tiny-cpu-data.sources.plays.weight1-data.sources.more.weight1",
                     "tiny-cpu-data.sources.plays.weight1-data.sources.more.weight3",
                     "tiny-cpu-data.sources.plays.weight2-data.sources.more.weight1",
                     "tiny-cpu-data.sources.plays.weight2-data.sources.more.weight3"]


@pytest.mark.parametrize("taken", ["sweep-dir-exists", "sweep-dir-is-a-file", "point-is-a-foreign-dir"])
def test_a_taken_target_leaves_nothing_written(tmp_path, capsys, taken):
    """The sweep directory or a point's directory taken (even under --force): nothing at all is written."""
    out = tmp_path / "runs"
    out.mkdir()
    force = []
    if taken == "sweep-dir-exists":
        (out / "tiny-cpu.sweep").mkdir()
        (out / "tiny-cpu.sweep" / "mine.txt").write_text("x")
    elif taken == "sweep-dir-is-a-file":
        (out / "tiny-cpu.sweep").write_text("x")
        force = ["--force"]
    else:
        (out / "tiny-cpu-lr3e-4").mkdir()
        (out / "tiny-cpu-lr3e-4" / "notes.txt").write_text("x")
        force = ["--force"]
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert main(["sweep", str(TINY), "--grid", "train.lr=1e-3,3e-4", "--out", str(out), *force]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fix:" in err, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_commands_given_a_sweep_directory_say_so(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["sweep", str(TINY), "--grid", "train.lr=1e-3,3e-4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    sweep_dir = out / "tiny-cpu.sweep"
    for args in (["verify", str(sweep_dir)], ["diff", str(sweep_dir), str(out / "tiny-cpu-lr1e-3")], ["eval", str(sweep_dir)],
                 ["run", str(sweep_dir), "--stage", "1"], ["data", "prepare", str(sweep_dir)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        if "--stage" in args:  # stepc run takes a sweep directory, but not one run's options
            assert err.startswith(f"error: {sweep_dir}: --stage and --allow-* apply to one run, not to a sweep"), err
            continue
        assert "`stepc run` (all points locally)" in err
        assert err.startswith(f"error: {sweep_dir}: this is a sweep directory (2 runs: tiny-cpu-lr1e-3, tiny-cpu-lr3e-4), "
                              "not a run directory") and f"e.g. {out / 'tiny-cpu-lr1e-3'}" in err, (args, err)
    # the plan table's tokens: the runs' own totals, not a rounded 0.00B
    for name in ("tiny-cpu-lr1e-3", "tiny-cpu-lr3e-4"):
        total = sum(s["tokens"] for s in json.loads((out / name / "manifest.json").read_text())["plan"]["stages"])
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        (shown,) = [cell for cell in row.split() if re.fullmatch(r"[0-9.]+[BM]", cell)]
        value = float(shown[:-1]) * {"B": 1e9, "M": 1e6}[shown[-1]]
        assert abs(value - total) <= 0.001 * total, (shown, total)


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


def test_a_sweep_runs_locally_one_lock_per_point_and_resumes(tmp_path, small_corpus):
    """`stepc run SWEEP --max-parallel 2` on 3 points while another launch holds the third point's run
    directory: the other two train at the same time, the third is refused by its own lock and named
    (exit 1); a rerun skips the finished points without starting anything."""
    import subprocess

    from stepc.runlock import acquire, release

    spec = tmp_path / "sw.toml"
    spec.write_text(SPEC.format(train=json.dumps(str(small_corpus / "train" / "*.txt")), port=29500, partition="debug"))
    out = tmp_path / "runs"
    assert main(["sweep", str(spec), "--grid", "train.lr=3e-3,1e-3,3e-4", "--out", str(out)]) == 0
    sweep_dir, names = out / "sw.sweep", ["sw-lr3e-3", "sw-lr1e-3", "sw-lr3e-4"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    def sweep_run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stepc.cli", "run", str(sweep_dir), "--max-parallel", "2"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)

    acquire(out / names[2], command="another launch (test)")
    try:
        first = sweep_run()
        second = sweep_run()
    finally:
        release(out / names[2])
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"1 of 3 points did not finish: {names[2]} (refused (exit 2)" in first.stderr, first.stderr
    assert "another launch is training this run directory" in (out / names[2] / "logs" / "stepc-run.log").read_text()
    assert not (out / names[2] / "metrics.jsonl").exists()  # the held point was never started
    spans = []
    for name in names[:2]:
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records if r["event"] == "stage_end"] == [1, 2]
        spans.append((records[0]["time"], records[-1]["time"]))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # the two points overlapped in time
    rows = {line.split()[0]: line for line in first.stdout.splitlines() if line.startswith("sw-lr") and "  " in line}
    assert re.fullmatch(r"sw-lr3e-3 +0\.003 +finished +\d\.\d{4} +heldout ppl [\d.]+ +0:00:\d\d", rows[names[0]]), rows
    assert re.fullmatch(r"sw-lr3e-4 +0\.0003 +refused \(exit 2\) +- +- +0:00:\d\d", rows[names[2]]), rows

    # the rerun: the finished points are skipped (nothing started: their logs and metrics are untouched)
    assert second.returncode == 1 and f"did not finish: {names[2]} (refused" in second.stderr, second.stderr
    assert "sweep sw: 3 points, 2 finished, running 1 (1 at a time)" in second.stdout, second.stdout
    for name in names[:2]:
        row = next(line for line in second.stdout.splitlines() if line.startswith(name + " "))
        assert "skipped (finished)" in row, row
        assert f"{name}: started" not in second.stdout
