"""Experiment trackers (TensorBoard, W&B, MLflow), fed the records metrics.jsonl gets.

One `Tracker` interface, one class per backend, each importing its library only when selected
(every backend is an optional extra). `MetricsWriter` hands every record it writes to `Tracking`,
which turns it into scalars at a global step (the record's step plus its stage's data offset, so
the stages of a run form one curve) and fans it out:

    train    -> train/loss, train/lr, train/tokens_per_s, train/mfu, train/peak_memory_bytes, ...
    eval     -> eval/ppl_<set>
    others   -> event/<name> = stage index (stage_start, stage_end, merge, checkpoint,
                nonfinite_loss), plus their numeric fields as <name>/<field>

The run's config is the normalised spec, the plan and the manifest hash (TensorBoard: text and the
HParams tab; W&B: the run config; MLflow: params). Where each tracker wrote and the one command that
opens it (`Tracking.where`) is printed at every stage start and at the end of the run. MLflow's
default store is an SQLite database, RUN_DIR/mlflow.db (artifacts in RUN_DIR/mlartifacts), which
`mlflow ui --backend-store-uri sqlite:///...` of the full mlflow package (`stepc[mlflow]`) serves as
it is; MLflow 3 serves a file store only with MLFLOW_ALLOW_FILE_STORE=true. A run directory is ONE
tracked run: its ids are kept in RUN_DIR/tracking.json (keyed by the manifest hash), so later
stages and resumed stages continue it rather than start new runs. A resumed TensorBoard writer
purges the steps after the checkpoint it resumed from; W&B and MLflow key points by the global step.

What a user can get wrong is refused with exit 2 before any rank starts: at compile time an MLflow
URI of a kind MLflow cannot store to here (`stepc.schema.trackers.check_log`), in the stage preflight a tracker directory
that is a file or cannot be written, or an MLflow server that does not answer within
`PROBE_TIMEOUT_S` (`check_targets`). A tracker that fails to open anyway stops the stage with one
message (exit 2), never a traceback per rank.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.rundir import RunDir
from stepc.schema.trackers import PROBE_TIMEOUT_S, check_log, mlflow_store

def check_targets(run_dir: Path, log, file: str) -> None:
    """Stage preflight (before torchrun): every tracker's local directory is a directory this process can
    write (it is created if missing), an SQLite database is not a directory, and an MLflow server answers.
    Raises UserError (exit 2)."""
    backends, paths = log.backends, RunDir(run_dir)
    dirs: list[tuple[str, Path, str]] = []
    if "tensorboard" in backends:
        dirs.append(("TensorBoard", paths.tensorboard, "log.backends"))
    if "wandb" in backends:
        dirs.append(("W&B", paths.wandb, "log.backends"))
    if "mlflow" in backends:
        kind, where = mlflow_store(log.mlflow_tracking_uri, run_dir)
        key = "log.mlflow_tracking_uri" if log.mlflow_tracking_uri else "log.backends"
        if kind == "file":
            dirs.append(("the MLflow file store", where, key))
        elif kind == "sqlite" and where is not None:
            if where.is_dir():
                raise UserError(f"the MLflow SQLite database {where} is a directory, not a file", file=file, key=key,
                                fix=f"remove or move {where} (stepc creates the database file), or drop mlflow from log.backends")
            dirs.append(("the MLflow SQLite database", where.parent, key))
        elif kind == "server":
            _probe_server(where, file)
        if kind in ("sqlite", "database"):
            dirs.append(("MLflow's artifacts", paths.mlflow_artifacts, key))
    for what, path, key in dirs:
        _writable_dir(what, path, key, file)


def _writable_dir(what: str, path: Path, key: str, file: str) -> None:
    import tempfile

    fix = f"remove or move {path} (stepc creates it as a directory), or drop the tracker from log.backends"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise UserError(f"{what} writes to {path}, which is not a directory", file=file, key=key, fix=fix)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        kind = "is not a directory" if isinstance(exc, (FileExistsError,
                                                        NotADirectoryError)) else f"cannot be written ({exc.strerror})"
        raise UserError(f"{what} writes to {path}, which {kind}", file=file, key=key,
                        fix=fix if kind.startswith("is not") else f"make {path} writable (a read-only or full disk?), "
                                                                    "or drop the tracker from log.backends") from None


def _probe_server(uri: str, file: str) -> None:
    """One request with a bounded timeout: any HTTP answer (even 401 or 404) means a server is there."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"the MLflow tracking server {uri} does not answer ({reason}; waited at most {PROBE_TIMEOUT_S:g} s)",
                        file=file, key="log.mlflow_tracking_uri",
                        fix="start the server (mlflow server --host ... --port ...) or correct the URI and recompile; "
                            "or drop mlflow from log.backends (metrics.jsonl has every record)") from None


class Tracker:
    """One backend's view of the run."""

    def log(self, step: int, scalars: dict[str, float], event: str | None, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, finished: bool) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where this backend wrote, and the one command that opens it (printed at each stage start and the run's end)."""
        raise NotImplementedError


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 3e-3, ...} for a nested dict (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def scalars_of(record: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """(event name for marker events or None, scalars by tag) of one metrics.jsonl record."""
    event = record.get("event", "")
    numeric = {k: float(v) for k, v in record.items()
               if k not in ("event", "stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if event in ("train", "eval"):
        return None, {f"{event}/{k}": v for k, v in numeric.items()}
    return event, {f"event/{event}": float(record.get("stage", 0)), **{f"{event}/{k}": v for k, v in numeric.items()}}


def hparams_of(config: dict[str, Any]) -> dict[str, float | str]:
    """The run's hyperparameters as the HParams plugin takes them (numbers and strings; bools as numbers by
    torch's hparams): the spec's keys, the plan's scalars and the manifest hash; lists as JSON, None left out."""
    values = flatten({"spec": config["spec"], "plan": {k: v for k, v in config["plan"].items() if k != "stages"}})
    values["manifest_hash"] = config["manifest_hash"]
    return {k: v if isinstance(v, (int, float, str)) else json.dumps(v) for k, v in sorted(values.items()) if v is not None}


class TensorBoard(Tracker):
    def __init__(self, log_dir: Path, config: dict[str, Any], first: bool, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = log_dir
        # purge_step: a resumed stage hides what a crashed attempt logged after the resumed checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1, flush_secs=30)
        if first:
            for name, value in config.items():
                self.writer.add_text(f"config/{name}", "```\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```", 0)
            # the HParams tab: this run's session start info, in the run's own directory (add_hparams would
            # start a second run in a subdirectory); TensorBoard infers the metric columns from the scalars
            _, session_start, _ = hparams(hparams_of(config), {})
            self.writer.file_writer.add_summary(session_start, 0)

    def log(self, step, scalars, event, record):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if event:
            self.writer.add_text("events", f"{event} (stage {record.get('stage')}, step {record.get('step')})", step)
        self.writer.flush()  # a crash must not lose what the console already showed

    def close(self, finished):
        self.writer.close()

    def where(self):
        # the run directory, not RUN_DIR/tensorboard: as a logdir of its own the run is named "." and the HParams
        # tab (TensorBoard 2.21) shows no metric values for it; this way it is "tensorboard", as it is
        # "<run>/tensorboard" under `tensorboard --logdir runs` comparing runs
        return f"tensorboard: {self.log_dir}; open: tensorboard --logdir {shlex.quote(str(self.log_dir.parent))}"


class Wandb(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, project: str, name: str,
                 entity: str | None, mode: str) -> None:
        import wandb

        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
        # console="off": W&B must not wrap stdout (the console checks isatty, SLURM logs stay as written)
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                  x_save_requirements=False)
        self.run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=mode, config=config, settings=settings)
        self.mode, self.files, self.run_id = mode, RunDir(run_dir).wandb, run_id
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, step, scalars, event, record):
        self.run.log({**scalars, "global_step": step})

    def close(self, finished):
        self.run.finish(exit_code=0 if finished else 1)

    def where(self):
        if self.mode == "online":
            return f"wandb: online, run {self.run_id}; open: {self.run.url}"
        # each stage (and each resumed attempt) is one offline directory of the same run id; sync uploads them all
        return (f"wandb: offline, run {self.run_id} in {self.files}; upload: "
                f"wandb sync {shlex.quote(str(self.files))}/offline-run-*-{self.run_id}")


def _wandb_logged_in() -> bool:
    """WANDB_API_KEY set, or a key `wandb login` stored in ~/.netrc: then "auto" logs online."""
    if "WANDB_API_KEY" in os.environ:
        return bool(os.environ["WANDB_API_KEY"])
    import netrc

    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1].split("/", 1)[0]
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MLflow(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, experiment: str, name: str,
                 uri: str | None) -> None:
        kind, where = mlflow_store(uri, run_dir)
        artifacts = None
        if kind == "file":
            # the file store is in maintenance mode in MLflow 3 and refused unless opted in; the user chose it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = where.resolve().as_uri()
        elif kind == "sqlite" and where is not None:
            uri = "sqlite:///" + str(where.resolve())  # absolute: the printed `mlflow ui` command works from anywhere
        if kind in ("sqlite", "database"):
            # a new experiment's artifacts in the run directory, not under the working directory (MLflow's ./mlruns)
            artifacts = RunDir(run_dir).mlflow_artifacts.resolve().as_uri()
        self.kind, self.uri, self.experiment = kind, uri, experiment
        # MLflow retries a server that does not answer for minutes (7 retries, 120 s timeouts): a bounded
        # wait, after which Tracking turns it off with one warning and training goes on
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(PROBE_TIMEOUT_S)))
        import logging

        # creating a database store logs its schema migrations at INFO on every rank-0 start
        for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment,
                                                                                            artifact_location=artifacts)
            run = self.client.create_run(experiment_id, run_name=name, tags={"stepc.manifest_hash": config["manifest_hash"]})
            self.run_id, self.experiment_id = run.info.run_id, experiment_id
            params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(
                {"spec": config["spec"], "plan": {k: v for k, v in config["plan"].items() if k != "stages"}}).items()}
            params["manifest_hash"] = config["manifest_hash"]
            batch = [Param(k, v[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=batch[i:i + 100])
            self.client.log_dict(self.run_id, config, "stepc/config.json")
        else:
            self.run_id = run_id
            self.experiment_id = self.client.get_run(run_id).info.experiment_id
            self.client.update_run(run_id, status="RUNNING")

    def where(self):
        run = f"experiment {self.experiment!r}, run {self.run_id}"
        if self.kind == "server":
            page = f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            return f"mlflow: {self.uri} ({run}); open: {page}"
        if self.kind == "other":
            return f"mlflow: {self.uri} ({run}); open it in the workspace that URI names"
        store = self.uri if self.kind != "database" else _without_password(self.uri)
        prefix = "MLFLOW_ALLOW_FILE_STORE=true " if self.kind == "file" else ""  # MLflow 3 refuses file stores otherwise
        return f"mlflow: {store} ({run}); open: {prefix}mlflow ui --backend-store-uri {shlex.quote(store)}"

    def log(self, step, scalars, event, record):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, finished):
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


def _without_password(uri: str) -> str:
    """A database URI as printed: user@host kept, the password (if the spec has one) masked."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Tracking:
    """The sink MetricsWriter feeds: global steps, fan-out, and one warning (not a crash) per failing backend."""

    def __init__(self, trackers: dict[str, Tracker], offsets: dict[int, int]) -> None:
        self.trackers, self.offsets, self.finished = trackers, offsets, False
        atexit.register(self.close)  # a stage that stops with an error still closes its runs

    def __call__(self, record: dict[str, Any]) -> None:
        step = self.offsets.get(record.get("stage", 0), 0) + int(record.get("step", 0))
        event, scalars = scalars_of(record)
        self.finished = event == "stage_end"
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, scalars, event, record)
            except Exception as exc:  # a tracker outage must not stop training; metrics.jsonl has everything
                print(f"warning: {name} tracking failed ({exc}); it is off for the rest of this stage, "
                      "metrics.jsonl keeps every record", file=sys.stderr, flush=True)
                del self.trackers[name]

    def where(self) -> list[str]:
        """One line per open tracker: where it wrote and the command that opens it."""
        return [tracker.where() for tracker in self.trackers.values()]

    def close(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close(self.finished)


def open_tracking(run_dir: Path, stage: int, start_step: int) -> Tracking | None:
    """Rank 0: the run's trackers for this stage (None when log.backends is empty)."""
    from stepc.atomic import atomic_write_json
    from stepc.rundir import RunDir
    from stepc.schema.manifest import load_manifest

    paths = RunDir(run_dir)
    manifest = load_manifest(run_dir)
    log, name, raw = manifest.spec.log, manifest.spec.experiment.name, manifest.raw
    if not log.backends:
        return None
    check_log(log, str(paths.manifest))
    offsets = {s.index: s.data_step_offset for s in manifest.plan.stages}
    config = {"spec": raw["spec"], "plan": raw["plan"], "manifest_hash": manifest.hash}
    state = json.loads(paths.tracking.read_text()) if paths.tracking.is_file() else {}
    if state.get("manifest_hash") != manifest.hash:  # a recompiled, different experiment is a new tracked run
        state = {"manifest_hash": manifest.hash}
    project = log.project or name
    trackers: dict[str, Tracker] = {}
    global_start = offsets[stage] + start_step
    for backend in log.backends:
        try:
            if backend == "tensorboard":
                trackers[backend] = TensorBoard(paths.tensorboard, config, "tensorboard" not in state, global_start)
                state["tensorboard"] = paths.tensorboard.name
            elif backend == "wandb":
                state.setdefault("wandb_id", uuid.uuid4().hex[:12])
                trackers[backend] = Wandb(run_dir, config, state["wandb_id"], project, name, log.wandb_entity, log.wandb_mode)
            elif backend == "mlflow":
                # the run id belongs to one store (a run directory tracked before the default became SQLite
                # has its run in RUN_DIR/mlruns): another store starts a new run there
                same_store = state.get("mlflow_store") == repr(log.mlflow_tracking_uri)
                tracker = MLflow(run_dir, config, state.get("mlflow_run_id") if same_store else None, project, name,
                                 log.mlflow_tracking_uri)
                state["mlflow_run_id"], state["mlflow_store"] = tracker.run_id, repr(log.mlflow_tracking_uri)
                trackers[backend] = tracker
        except Exception as exc:  # noqa: BLE001 - each library raises its own types; the preflight catches the usual ones
            for opened in trackers.values():
                opened.close(False)
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise UserError(f"the {backend} tracker cannot start: {reason}", file=str(paths.manifest), key="log.backends",
                            fix=f"correct the [log] settings and recompile, or drop {backend} from log.backends "
                                "(metrics.jsonl has every record)") from None
    atomic_write_json(paths.tracking, state)
    return Tracking(trackers, offsets)
