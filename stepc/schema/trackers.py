"""The [log] table's trackers as far as both halves need them, torch- and tracker-free: which library
each backend needs, which store an MLflow URI names (`mlflow_store`, also used by the runtime to
open it), and the check `stepc compile`, `stepc plan` and `stepc sweep` run (`check_log`): every
selected backend installed, the MLflow URI a store this MLflow can write. The runtime's trackers
themselves are stepc/runtime/loop/tracking.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from stepc.errors import UserError
from stepc.rundir import RunDir

# backend -> (module that must be importable, pip extra)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_installed(backends: list[str], file: str | None = None) -> None:
    """Compile time: refuse a selected backend whose library is not installed (the runtime would fail later)."""
    missing = [b for b in backends if importlib.util.find_spec(BACKENDS[b][0]) is None]
    if missing:
        extras = ",".join(BACKENDS[b][1] for b in missing)
        raise UserError(f"log.backends selects {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
                        file=file, key="log.backends", fix=f"pip install 'stepc[{extras}]', or remove it from log.backends")


# MLflow's tracking stores by URI scheme (mlflow.tracking._tracking_service.utils): a plain path is a file store
FILE_SCHEMES = ("", "file")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores, each with an optional +driver
SERVER_SCHEMES = ("http", "https")
OTHER_SCHEMES = ("databricks", "databricks-uc", "uc")
PROBE_TIMEOUT_S = 10.0  # an MLflow server must answer the preflight within this (MLflow itself retries for minutes)


def mlflow_store(uri: str | None, run_dir: Path | None) -> tuple[str, Any]:
    """("sqlite", database file) for an SQLite store (the default: RUN_DIR/mlflow.db; None when run_dir is
    None and the URI is unset, or for an in-memory database), ("file", directory) for a file store,
    ("database", scheme) for the other SQLAlchemy stores, ("server", uri) or ("other", scheme). A scheme
    MLflow has no store for is a UserError naming log.mlflow_tracking_uri."""
    from urllib.parse import unquote, urlparse

    if uri is None:
        return "sqlite", None if run_dir is None else RunDir(run_dir).mlflow_db
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower().split("+", 1)[0]
    if len(scheme) == 1:  # a Windows drive letter, C:/mlruns
        scheme = ""
    if scheme in FILE_SCHEMES:
        return "file", Path(unquote(parsed.path) if scheme == "file" else uri).expanduser()
    if scheme == "sqlite":  # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db, sqlite:// in memory
        path = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
        return "sqlite", Path(unquote(path)).expanduser() if path else None
    if scheme in DATABASE_SCHEMES:
        return "database", scheme
    if scheme in SERVER_SCHEMES and parsed.netloc:
        return "server", uri
    if scheme in OTHER_SCHEMES:
        return "other", scheme
    why = "no host in the URL" if scheme in SERVER_SCHEMES else f"unknown scheme {scheme!r}"
    raise UserError(f"MLflow cannot track to {uri!r}: {why}",
                    key="log.mlflow_tracking_uri",
                    fix='write a server URL ("http://host:5000"), a database URI ("sqlite:///mlflow.db") or a directory '
                        '(a file store); or leave it unset for RUN_DIR/mlflow.db')


def check_log(log, file: str | None = None) -> None:
    """Compile time: every selected backend is installed, and the MLflow URI names a store this MLflow
    can write (a database store, the default SQLite one included, needs SQLAlchemy, which mlflow-skinny
    lacks; a file store must be a directory, an SQLite database a file)."""
    check_installed(log.backends, file)
    if "mlflow" not in log.backends:
        return
    try:
        kind, where = mlflow_store(log.mlflow_tracking_uri, None)
    except UserError as err:
        err.file = file
        raise
    key = "log.mlflow_tracking_uri" if log.mlflow_tracking_uri else "log.backends"
    if kind in ("sqlite", "database") and any(importlib.util.find_spec(m) is None for m in ("sqlalchemy", "alembic")):
        store = "the default SQLite store (RUN_DIR/mlflow.db)" if log.mlflow_tracking_uri is None else f"a {kind} database"
        raise UserError(f"MLflow tracks to {store}, which needs SQLAlchemy and Alembic (not installed: mlflow-skinny "
                        "has no database stores)", file=file, key=key,
                        fix="pip install 'stepc[mlflow]' (the full mlflow package, which also serves `mlflow ui`), "
                            "or track to a server URL or a directory")
    if kind == "file" and where.exists() and not where.is_dir():
        raise UserError(f"the MLflow file store {where} is a file, not a directory", file=file,
                        key=key, fix=f"name a directory (it is created if missing), or move {where} away")
    if kind == "sqlite" and where is None and log.mlflow_tracking_uri is not None:
        raise UserError(f"{log.mlflow_tracking_uri!r} is an in-memory SQLite database: nothing would be kept", file=file,
                        key=key, fix='name a database file, e.g. "sqlite:///mlflow.db", or leave it unset for RUN_DIR/mlflow.db')
    if kind == "sqlite" and where is not None and where.is_dir():
        raise UserError(f"the MLflow SQLite database {where} is a directory, not a file", file=file, key=key,
                        fix=f"name a database file (it is created if missing), or move {where} away")
