"""The only module that talks to MLflow: where runs go, starting and ending them, what they log."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests

from classifier.errors import UserError

DEFAULT_DATABASE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
REACHABLE_TIMEOUT_S = 5


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded default: a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DATABASE}"


def connect() -> str:
    """Point MLflow at the tracking store, failing within seconds when a server is unreachable."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=REACHABLE_TIMEOUT_S).raise_for_status()
        except requests.RequestException as error:
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri}: tracking server unreachable ({type(error).__name__}); "
                "start it or unset MLFLOW_TRACKING_URI to track locally"
            ) from error
    mlflow.set_tracking_uri(uri)
    mlflow.config.enable_async_logging(True)
    return uri


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created on first use (with a local artifact folder on the embedded store)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (Path.cwd() / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another worker
        return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume `run_id`, or join the run `mlflow run` made) and end it as FINISHED, FAILED or KILLED."""
    if run_id is None and parent_run_id is None and os.environ.get("MLFLOW_RUN_ID"):
        # Join the run `mlflow run` made; drop the variable so nested runs are not redirected to it (mlflow #15713).
        run_id = os.environ.pop("MLFLOW_RUN_ID")
    kwargs: dict[str, Any] = {"run_id": run_id, "log_system_metrics": system_metrics or None}
    if run_id is None:
        kwargs.update(experiment_id=experiment_id(experiment), run_name=run_name, tags=tags)
        if parent_run_id is not None:
            kwargs.update(parent_run_id=parent_run_id, nested=True)
    run = mlflow.start_run(**kwargs)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.flush_async_logging()
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.flush_async_logging()
        mlflow.end_run("FAILED")
        raise
    mlflow.flush_async_logging()
    mlflow.end_run("FINISHED")
