"""The training console without torchrun: a tqdm bar on a pseudo-terminal, whole lines into a pipe.

(tests/test_tracking.py checks both modes again through a real stage run.)
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import termios
import json
from pathlib import Path
from types import SimpleNamespace

from stepc.runtime.loop.console import Console, echo, fit
from stepc.runtime.loop.eta import RunEta

# stage 2 costs twice stage 1's FLOPs
STAGES = [SimpleNamespace(index=1, steps=20, flops=1e12, tokens=10**6), SimpleNamespace(index=2, steps=20, flops=2e12,
                                                                                        tokens=10**6)]


def started_eta() -> RunEta:
    """Stage 1 launched at t=0, training from t=5 (5 s start-up); its first 10 steps took 2 s (0.2 s a step);
    no evaluation or checkpoint yet (every 100 steps: none will come but each stage's final evaluation,
    estimated from 1,000 eval tokens at a third of the training rate)."""
    eta = RunEta(STAGES, eval_every=100, checkpoint_every=100, eval_tokens=1000)
    eta.observe({"event": "stage_start", "stage": 1, "step": 0, "time": 5.0, "launched": 0.0})
    eta.observe({"event": "train", "stage": 1, "step": 10, "time": 7.0})
    return eta


def drive(stream) -> None:
    console = Console(1, STAGES, 0, True, stream, eta=started_eta())
    console.update(10, 3.2, 1e-3, 5000.0, 0.41, 2_500_000_000)
    echo("eval stage 1 step 10: heldout ppl 24.50")
    console.update(20, 3.1, 5e-4, 5000.0, None, 2_500_000_000)
    console.close()
    stream.flush()


def drive_terminal(columns: int) -> str:
    """What drive() writes to a pseudo-terminal `columns` wide, as the terminal received it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    with os.fdopen(slave, "w") as stream:
        drive(stream)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the terminal's writer is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def test_terminal_gets_a_bar_redrawn_in_place():
    out = drive_terminal(200)
    assert re.search(r"\r(?!\n)", out)
    # test_the_eta_counts_what_remains_term_by_term: 15.004 s after step 10, 13.003 s after step 20
    assert re.search(r"stage 1/2 10/20 \|[^|]+\| eta stage 0:00:02 run 0:00:15 loss 3.2000 5,000 tok/s lr 1.00e-03 "
                     r"MFU 41.0% proc peak 2.500 GB", out), out
    assert "eval stage 1 step 10: heldout ppl 24.50" in out
    assert re.search(r"stage 1/2 20/20 \|[^|]+\| eta stage 0:00:00 run 0:00:13 loss 3.1000 5,000 tok/s lr 5.00e-04 proc peak "
                     r"2.500 GB", out)


def test_a_pipe_gets_whole_lines_only():
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream:
        drive(stream)
    with os.fdopen(read) as pipe:
        out = pipe.read()
    assert "\r" not in out
    assert out.splitlines() == [
        "stage 1/2 step 10/20 eta stage 0:00:02 run 0:00:15 loss 3.2000 5,000 tok/s lr 1.00e-03 MFU 41.0% proc peak 2.500 GB",
        "stage 1/2 step 20/20 eta stage 0:00:00 run 0:00:13 loss 3.1000 5,000 tok/s lr 5.00e-04 proc peak 2.500 GB",
    ]


def test_the_eta_counts_what_remains_term_by_term():
    """started_eta(): 0.2 s a step (one window: no warm-up separable yet), 0.2 s per 5e10 FLOPs. Stage 1
    after step 10: 10 steps = 2 s, its final evaluation 1,000 tokens x 1e6 FLOPs/token / 3 at 4e-12 s/FLOP
    = 0.00133 s; stage 2: 2e12 FLOPs = 8 s, its evaluation 0.00267 s, its start-up 5 s: 15.004 s in all."""
    stage, run = started_eta().remaining(1, 10)
    assert abs(stage - 2.00133) < 1e-4 and abs(run - 15.004) < 1e-3, (stage, run)
    assert RunEta(STAGES, 100, 100, 1000).remaining(1, 0) is None  # nothing measured: no guess


def test_the_step_line_keeps_the_run_eta_on_an_80_column_terminal():
    console = Console(1, STAGES, 0, enabled=False, eta=started_eta())
    fields = console.fields(10, 3.2, 1e-3, 5000.0, 0.41, 2_500_000_000)
    head = "stage 1/2 10/20"
    shown = fit(head, fields, 80)
    assert shown.startswith("eta stage 0:00:02 run 0:00:15 loss 3.2000")
    assert len(f"{head} |{'#' * 10}| {shown}") < 80  # the line tqdm draws, with the narrowest bar
    assert fit(head, fields, 200) == " ".join(fields)  # a wide terminal shows everything


def test_an_80_column_terminal_gets_lines_that_fit_with_the_eta():
    redraws = [part for part in re.split(r"[\r\n]", drive_terminal(80)) if "stage 1/2" in part]
    redraws = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", part) for part in redraws]  # tqdm's cursor moves
    assert any("run 0:00:15" in part for part in redraws), redraws
    assert all(len(part) < 80 for part in redraws), [len(p) for p in redraws]


RECORDED = Path(__file__).resolve().parent / "eta_recorded_run.json"
TOLERANCE = 0.35  # see the docstring


def test_the_eta_of_a_recorded_run_is_within_35_percent_of_what_remained():
    """A real run of the test spec (2 stages of 120 and 261 steps, 2 CPU ranks; metrics.jsonl's records,
    only the fields the ETA reads) replayed through RunEta: the ETA printed last before 25% and before 50%
    of the run's wall time (first stage start to last stage_end) is within 35% of the time that remained."""
    recorded = json.loads(RECORDED.read_text())
    stages = [SimpleNamespace(**s) for s in recorded["stages"]]
    eta = RunEta(stages, recorded["eval_every"], recorded["checkpoint_every"], recorded["eval_tokens"])
    records = recorded["records"]
    began, end = records[0]["launched"], records[-1]["time"]
    printed = []  # (time, ETA of the run) at every train record, as the console printed it
    for record in records:
        eta.observe(record)
        if record["event"] == "train":
            printed.append((record["time"], eta.remaining(record["stage"], record["step"])[1]))
    for fraction in (0.25, 0.5):
        at, estimate = [p for p in printed if p[0] <= began + fraction * (end - began)][-1]
        real = end - at
        assert abs(estimate / real - 1) <= TOLERANCE, (fraction, estimate, real)


def test_the_eta_adds_warm_up_evaluations_checkpoints_start_up_and_wind_down():
    """Measured: start-up 5 s; steps 1-5 in 2 s (warm-up), 6-10 in 0.5 s = 0.1 s a step steady, so 1.5 s
    of warm-up; a checkpoint of 1 s and an evaluation of 2 s (stage 1: 1e6 FLOPs per token; stage 2's
    cost twice as much). After step 10 of stage 1: 10 steps = 1 s, a checkpoint (15) and the final
    evaluation = 3 s, the wind-down (unmeasured: two checkpoints) = 2 s: 6 s. Stage 2: 2e12 FLOPs at
    2e-12 s/FLOP = 4 s, 3 checkpoints and 2 evaluations at twice the cost = 14 s, start-up 5 s, warm-up
    1.5 s, wind-down 2 s: 26.5 s. The run: 32.5 s."""
    eta = RunEta(STAGES, eval_every=10, checkpoint_every=5, eval_tokens=1000)
    for record in ({"event": "stage_start", "stage": 1, "step": 0, "time": 5.0, "launched": 0.0},
                   {"event": "train", "stage": 1, "step": 5, "time": 7.0},
                   {"event": "checkpoint", "stage": 1, "step": 5, "time": 8.0, "seconds": 1.0},
                   {"event": "train", "stage": 1, "step": 10, "time": 8.5},
                   {"event": "eval", "stage": 1, "step": 10, "time": 10.5, "seconds": 2.0}):
        eta.observe(record)
    stage, run = eta.remaining(1, 10)
    assert abs(stage - 6.0) < 1e-9 and abs(run - 32.5) < 1e-9, (stage, run)


def test_a_piped_stepc_run_and_eval_print_no_carriage_return_and_no_per_unit_lines(full_run, tmp_path):
    """The session's `stepc run` (output captured: a pipe) and `stepc eval` of it: whole lines only, and the
    data preparation is a few summary lines, not one per unit tokenised."""
    import shutil
    import subprocess
    import sys

    log = (full_run / "stepc-run.log").read_text()
    assert "\r" not in log and "units tokenised" not in log
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir, symlinks=True)
    proc = subprocess.run([sys.executable, "-m", "stepc.cli", "eval", str(run_dir)], cwd=run_dir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "perplexity heldout" in proc.stdout, proc.stdout + proc.stderr


def test_the_launcher_sets_the_worker_threads_so_torchrun_prints_no_banner(tmp_path):
    """stepc.runtime.launch without OMP_NUM_THREADS in the environment, 2 workers: no torchrun warning,
    and each worker gets the CPUs shared out (what the stage's own threads would be)."""
    import subprocess
    import sys

    from stepc.runtime.device import worker_threads

    worker = tmp_path / "worker.py"
    # One write(2) per worker: two workers share the pipe, and print() under PYTHONUNBUFFERED writes
    # each argument on its own, so the two lines could interleave ("threadsthreads 1 \n1").
    worker.write_text("import os\nos.write(1, f\"threads {os.environ['OMP_NUM_THREADS']}\\n\".encode())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "stepc.runtime.launch", "--standalone", "--nproc_per_node=2", str(worker)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OMP_NUM_THREADS" not in proc.stderr and "*****" not in proc.stderr, proc.stderr
    assert proc.stdout.split().count("threads") == 2 and f"threads {worker_threads(2)}" in proc.stdout, proc.stdout
