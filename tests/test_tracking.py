"""[log] backends with the real libraries writing local files, and the live console in both modes.

One run (1 gloo rank, 2 stages of 18 + 20 steps) with TensorBoard, W&B (offline) and MLflow (its
default SQLite store) selected: stage 1 stops on an injected non-finite loss at step 15 (after checkpoints at 6
and 12), is rerun on a pseudo-terminal (the tqdm console) and resumes from step 12, then stage 2
runs through a pipe (plain lines). The trackers must hold one run for the whole run directory whose
points equal metrics.jsonl's, with the crashed attempt's steps after the resumed checkpoint gone.
The commands the console prints to open them are run as a user would (`tensorboard --logdir ...`,
`mlflow ui --backend-store-uri ...`, in the user's environment) and their servers queried over HTTP.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import STAGE_TIMEOUT, check_ok, read_metrics, stage_env

from stepc.cli import main

BACKENDS = ["tensorboard", "wandb", "mlflow"]


def run_on_pty(run_dir: Path, stage: int) -> tuple[int, str]:
    """Run stage-<stage>.sh with stdout and stderr on a pseudo-terminal; return (exit code, all output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # 40 rows, 200 columns
    env = {**stage_env(1), "TERM": "xterm"}
    proc = subprocess.Popen(["bash", str(run_dir / f"stage-{stage}.sh")], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, cwd=run_dir)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=STAGE_TIMEOUT), b"".join(chunks).decode(errors="replace")


def wandb_records(path: Path):
    """The protobuf records of a W&B offline .wandb file.

    wandb >= 0.19 no longer ships a Python reader (its Go core writes the file): the format is a
    7-byte W&B header, then a LevelDB log (32 KiB blocks; records of crc32, length, type, payload,
    split FIRST/MIDDLE/LAST across blocks).
    """
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            yield payload
        elif kind == 2:  # FIRST
            pending = payload
        elif kind == 3:  # MIDDLE
            pending += payload
        elif kind == 4:  # LAST
            yield pending + payload
            pending = b""


def curve(records: list[dict], offsets: dict[int, int], key: str = "loss") -> dict[int, float]:
    out = {}
    for r in records:
        if r["event"] == "train":
            out[offsets[r["stage"]] + r["step"]] = r[key]
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, small_corpus):
    from conftest import RunFactory

    root = tmp_path_factory.mktemp("tracked")
    run_dir = RunFactory(root, small_corpus).compile(
        "trk", log={"backends": BACKENDS, "wandb_mode": "offline", "project": "stepc-test"}, launch={"nproc_per_node": 1})
    env = {"STEPC_FAULT_NONFINITE_AT_STEP": "15", "WANDB_API_KEY": ""}
    crashed = run_piped(run_dir, 1, env)
    assert crashed.returncode != 0 and "non-finite loss" in crashed.stderr, crashed.stderr[-3000:]
    code, tty = run_on_pty(run_dir, 1)
    assert code == 0, tty[-4000:]
    second = check_ok(run_piped(run_dir, 2))
    return run_dir, crashed, tty, second


def run_piped(run_dir: Path, stage: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The stage with stdout and stderr on pipes, as in a SLURM log; bytes decoded without newline translation
    (text=True would turn every carriage return into a newline)."""
    proc = subprocess.run(["bash", str(run_dir / f"stage-{stage}.sh")], env={**stage_env(1), **(env or {})}, cwd=run_dir,
                          capture_output=True, timeout=STAGE_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def test_console_redraws_on_a_terminal_and_prints_lines_into_a_pipe(tracked):
    run_dir, crashed, tty, piped = tracked
    assert "resumed stage 1" in tty
    assert re.search(r"\r(?!\n)", tty), "no in-place redraw on the terminal"
    bar = re.findall(r"stage 1/2 (\d+)/18 \|[^|]*\| eta stage \S+ run \S+ loss \S+ [\d,]+ tok/s lr \S+ proc peak [\d.]+ GB", tty)
    assert bar and bar[-1] == "18", tty[-2000:]
    for out in (crashed.stdout, crashed.stderr, piped.stdout, piped.stderr):
        assert "\r" not in out  # nothing but whole lines in a log file (transformers' bars are off too)
    lines = re.findall(r"^stage 2/2 step (\d+)/20 eta stage (\S+) run (\S+) loss [\d.]+ [\d,]+ tok/s lr \S+ proc peak [\d.]+ GB$",
                       piped.stdout, re.M)
    assert [step for step, _, _ in lines] == ["10", "20"], piped.stdout[-2000:]
    # the last step of the last stage: what is left is this stage's wind-down (its export), nothing after it
    stage_left, run_left = lines[-1][1:]
    assert stage_left == run_left and stage_left.startswith("0:00:"), lines[-1]
    assert re.search(r"^stage 1/2 step 10/18 eta stage \d+:\d\d:\d\d run \d+:\d\d:\d\d .*$", crashed.stdout, re.M)


def test_tensorboard_holds_metrics_jsonl_with_the_crash_purged(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    offsets = {s["index"]: s["data_step_offset"] for s in manifest["plan"]["stages"]}
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss.keys() == curve(read_metrics(run_dir), offsets).keys() == {10, 18, 28, 38}
    for step, value in curve(read_metrics(run_dir), offsets).items():
        assert value == pytest.approx(loss[step], rel=1e-6)
    assert [e.step for e in acc.Scalars("event/checkpoint")] == [6, 12, 24, 30, 36]
    assert [e.value for e in acc.Scalars("event/stage_end")] == [1.0, 2.0]
    assert [r["step"] for r in read_metrics(run_dir) if r["event"] == "nonfinite_loss"] == [15]  # the crash was logged
    assert acc.Scalars("event/nonfinite_loss") == []  # ... and purged from TensorBoard when stage 1 resumed at 12
    assert {"eval/ppl_heldout", "eval/ppl_play", "train/lr", "train/tokens_per_s", "train/peak_memory_bytes"} <= set(tags)
    text = acc.Tags()["tensors"]
    assert "config/manifest_hash/text_summary" in text, text


def test_wandb_offline_is_one_run_continued_by_every_stage(tracked):
    run_dir = tracked[0]
    state = json.loads((run_dir / "tracking.json").read_text())
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(r.name.endswith("-" + state["wandb_id"]) for r in runs)  # crash, resume, stage 2
    from wandb.proto import wandb_internal_pb2

    history: dict[int, float] = {}
    config = None
    for run in runs:
        for data in wandb_records(next(run.glob("*.wandb"))):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "train/loss" in items:
                    history[int(items["global_step"])] = items["train/loss"]
            if record.HasField("run") and config is None:
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert config["manifest_hash"] == manifest["hash"] and config["plan"]["layers"] == manifest["plan"]["layers"]
    offsets = {s["index"]: s["data_step_offset"] for s in manifest["plan"]["stages"]}
    expected = curve(read_metrics(run_dir), offsets)
    assert history.keys() == expected.keys()
    assert all(history[k] == pytest.approx(v, rel=1e-9) for k, v in expected.items())


def opened_by(output: str, prefix: str, backend: str) -> tuple[str, str]:
    """(where, command) of the console's `<prefix> <backend>: WHERE; open: COMMAND` line (the last one)."""
    found = re.findall(rf"^{prefix} {backend}: (.*); (?:open|upload): (.*)$", output, re.M)
    assert found, output[-3000:]
    return found[-1]


def test_every_stage_start_and_the_run_end_say_where_each_tracker_wrote(tracked):
    run_dir, crashed, tty, piped = tracked
    for output in (crashed.stdout, tty, piped.stdout):  # each stage start
        for backend in BACKENDS:
            opened_by(output, "tracking", backend)
    assert "tracked " not in crashed.stdout + tty  # the run's end is the last stage's
    tb_dir, tb_command = opened_by(piped.stdout, "tracked", "tensorboard")
    assert tb_dir == str(run_dir.resolve() / "tensorboard")
    assert shlex.split(tb_command) == ["tensorboard", "--logdir", str(run_dir.resolve())]
    state = json.loads((run_dir / "tracking.json").read_text())
    where, upload = opened_by(piped.stdout, "tracked", "wandb")
    assert where == f"offline, run {state['wandb_id']} in {run_dir.resolve() / 'wandb'}", where
    assert upload.startswith("wandb sync ")
    # the shell expands the printed pattern to every offline directory of the run (crash, resume, stage 2)
    expanded = subprocess.run(["bash", "-c", f"for d in {upload[len('wandb sync '):]}; do echo $d; done"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert sorted(expanded) == sorted(str(p) for p in (run_dir.resolve() / "wandb").glob("offline-run-*")) and len(expanded) == 3
    where, command = opened_by(piped.stdout, "tracked", "mlflow")
    store = "sqlite:///" + str(run_dir.resolve() / "mlflow.db")
    assert where == f"{store} (experiment 'stepc-test', run {state['mlflow_run_id']})", where
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", store]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_command(command: str, *extra: str) -> subprocess.Popen:
    """The printed command as a user runs it: their PATH (this interpreter's scripts first, where pip put
    them), their environment without anything stepc set for its own writes, on a loopback port."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = shlex.split(command)
    assert shutil.which(argv[0], path=env["PATH"]), f"{argv[0]} is not installed (the test extra installs it)"
    return subprocess.Popen([*argv, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:g} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: its workers too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_printed_commands_open_the_run(tracked):
    """`mlflow ui --backend-store-uri ...` and `tensorboard --logdir ...` exactly as printed, queried over HTTP:
    MLflow's REST API has the run with metrics.jsonl's curve, TensorBoard's the curve and the HParams tab's
    session with the spec's values."""
    run_dir, _, _, piped = tracked
    manifest = json.loads((run_dir / "manifest.json").read_text())
    offsets = {s["index"]: s["data_step_offset"] for s in manifest["plan"]["stages"]}
    expected = curve(read_metrics(run_dir), offsets)
    mlflow_port, tb_port = free_port(), free_port()
    mlflow_ui = user_command(opened_by(piped.stdout, "tracked", "mlflow")[1], "--host", "127.0.0.1", "--port",
                             str(mlflow_port), "--workers", "1")
    board = user_command(opened_by(piped.stdout, "tracked", "tensorboard")[1], "--host", "127.0.0.1", "--port", str(tb_port))
    try:
        api = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow"
        wait_until_serving(mlflow_ui, f"http://127.0.0.1:{mlflow_port}/health")
        experiment = http_json(f"{api}/experiments/get-by-name?experiment_name=stepc-test")["experiment"]
        (run,) = http_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["manifest_hash"] == manifest["hash"]
        assert params["spec.train.lr"] == json.dumps(manifest["spec"]["train"]["lr"])
        history = http_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=train/loss")["metrics"]
        assert {m["step"]: m["value"] for m in history} == pytest.approx(expected)
        ends = http_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=event/stage_end")["metrics"]
        assert sorted(m["step"] for m in ends) == [18, 38]
        assert run["info"]["artifact_uri"].startswith((run_dir.resolve() / "mlartifacts").as_uri())

        base = f"http://127.0.0.1:{tb_port}"
        wait_until_serving(board, f"{base}/data/runs")
        deadline = time.monotonic() + 60  # TensorBoard loads the event files in the background after it starts
        while "tensorboard" not in http_json(f"{base}/data/runs") and time.monotonic() < deadline:
            time.sleep(0.5)
        loss = http_json(f"{base}/data/plugin/scalars/scalars?run=tensorboard&tag=train/loss")
        assert {step: value for _, step, value in loss} == pytest.approx(expected)
        experiment = http_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        (loss_metric,) = [m["name"] for m in experiment["metricInfos"] if m["name"]["tag"] == "train/loss"]
        groups = http_json(f"{base}/data/plugin/hparams/session_groups",
                           {"experimentName": "", "startIndex": 0, "sliceSize": 10, "allowedStatuses": [
                               "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                            "colParams": [{"hparam": "spec.train.lr"}, {"hparam": "plan.method"}, {"hparam": "manifest_hash"},
                                          {"hparam": "spec.model.num_layers"}, {"metric": loss_metric}]})
        (group,) = groups["sessionGroups"]
        hparams = group["hparams"]
        assert hparams["spec.train.lr"] == manifest["spec"]["train"]["lr"]
        assert hparams["spec.model.num_layers"] == manifest["spec"]["model"]["num_layers"]
        assert hparams["plan.method"] == manifest["plan"]["method"] and hparams["manifest_hash"] == manifest["hash"]
        last = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}  # the tab's metric column: the last value
        assert last["train/loss"] == pytest.approx(expected[max(expected)])
    finally:
        stop(mlflow_ui)
        stop(board)


def test_tensorboard_event_files_hold_the_hparams_session(tracked):
    """The HParams plugin's data as written (without a server): one session start info with the spec's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run_dir = tracked[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert list(content) == [metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert values["spec.train.lr"] == manifest["spec"]["train"]["lr"]
    assert values["spec.train.global_batch_tokens"] == manifest["spec"]["train"]["global_batch_tokens"]
    assert values["plan.layers"] == json.dumps(manifest["plan"]["layers"])
    assert values["spec.experiment.name"] == manifest["spec"]["experiment"]["name"]


def test_a_missing_backend_is_refused_at_compile_time(tmp_path, monkeypatch, capsys, small_corpus):
    from conftest import RunFactory

    spec = RunFactory(tmp_path, small_corpus).spec("nolib", log={"backends": ["wandb"]})
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the extra looks like to import
    assert main(["compile", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "[log.backends]" in err and "pip install 'stepc[wandb]'" in err
    assert not (tmp_path / "out").exists()
    assert main(["compile", str(spec), "--out", str(tmp_path / "out"), "--set", "log.backends=[]"]) == 0


def test_the_tracked_run_id_is_kept_per_experiment(tmp_path, small_corpus):
    """Without training: a later stage reopens the same MLflow run and W&B id; a different experiment gets new ones."""
    from conftest import RunFactory
    from mlflow.tracking import MlflowClient

    from stepc.runtime.loop.tracking import open_tracking

    factory = RunFactory(tmp_path, small_corpus)
    run_dir = factory.compile("ids", log={"backends": ["mlflow"], "project": "ids"})
    first = open_tracking(run_dir, 1, 0)
    first({"event": "train", "stage": 1, "step": 10, "loss": 2.5})
    first.close()
    state = json.loads((run_dir / "tracking.json").read_text())
    again = open_tracking(run_dir, 2, 0)
    again({"event": "train", "stage": 2, "step": 10, "loss": 2.0})
    again({"event": "stage_end", "stage": 2, "step": 20})
    again.close()
    assert json.loads((run_dir / "tracking.json").read_text()) == state
    client = MlflowClient(tracking_uri="sqlite:///" + str((run_dir / "mlflow.db").resolve()))
    (run,) = client.search_runs([client.get_experiment_by_name("ids").experiment_id])
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FINISHED"
    offset = json.loads((run_dir / "manifest.json").read_text())["plan"]["stages"][1]["data_step_offset"]
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == {10: 2.5, offset + 10: 2.0}

    # the same run directory recompiled as another experiment: a new tracked run
    spec = factory.spec("ids", log={"backends": ["mlflow"], "project": "ids"}, train={"lr": 1e-3})
    assert main(["compile", str(spec), "--out", str(run_dir.parent), "--force"]) == 0
    open_tracking(run_dir, 1, 0).close()
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] != state["mlflow_run_id"]
    assert len(client.search_runs([client.get_experiment_by_name("ids").experiment_id])) == 2
