"""The only module that talks to MLflow: where runs go, starting and ending them, what they log."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from optuna import TrialPruned

from classifier.console import verbose
from classifier.data.layout import INFO_FILE, MANIFEST_FILE, DatasetInfo, images_per_split, read_manifest
from classifier.errors import UserError

DEFAULT_DATABASE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
REACHABLE_TIMEOUT_S = 5
FAILURE_TAG = "classifier.failure"  # why a FAILED run failed, one line


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
            signed_in = requests.get(
                f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                auth=_credentials(),
                timeout=REACHABLE_TIMEOUT_S,
            )
        except requests.RequestException as error:
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri}: tracking server unreachable ({type(error).__name__}); "
                "start it or unset MLFLOW_TRACKING_URI to track locally"
            ) from error
        if signed_in.status_code in (401, 403):
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server refuses these credentials ({signed_in.status_code}); "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of its basic-auth"
            )
    # Batch queued metrics for up to a second: ending a run then takes ~0.1 s, not the ~1 s that the unbuffered
    # queue's blocking read holds up every flush and end_run (measured in bench/tracking_bench.py).
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    mlflow.set_tracking_uri(uri)
    # Not mlflow.config.enable_async_logging: the system-metrics thread would then log through the same queue that
    # each run's end shuts down and restarts, and a trial's next metrics meet a pool shut down under them ("cannot
    # schedule new futures after shutdown", a trial FAILED). Our metrics, params and tags ask for asynchrony call by
    # call; the monitor thread logs synchronously.
    return uri


def _credentials() -> tuple[str, str] | None:
    """The basic-auth user MLflow's client signs in with (MLFLOW_TRACKING_USERNAME / _PASSWORD), if any."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password or "") if user else None


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created on first use (with a local artifact folder on the embedded store)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # the embedded store keeps artifacts in a folder beside its database
        location = (Path(uri.removeprefix("sqlite:///")).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
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
    joined = run_id is None and parent_run_id is None and bool(os.environ.get("MLFLOW_RUN_ID"))
    if joined:
        # Join the run `mlflow run` made; drop the variable so nested runs are not redirected to it (mlflow #15713).
        run_id = os.environ.pop("MLFLOW_RUN_ID")
    if system_metrics and not verbose():  # "Started/Stopping system metrics monitoring" on every run: INFO noise
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    kwargs: dict[str, Any] = {"run_id": run_id, "log_system_metrics": system_metrics or None}
    if run_id is None:
        kwargs.update(experiment_id=experiment_id(experiment), run_name=run_name, tags=tags)
        if parent_run_id is not None:
            kwargs.update(parent_run_id=parent_run_id, nested=True)
    run = mlflow.start_run(**kwargs)
    if joined and run_name:  # `mlflow run` names its run like `worried-sheep-206`: say what the command is
        mlflow.set_tag("mlflow.runName", run_name)
    try:
        yield run
    except (KeyboardInterrupt, TrialPruned):
        mlflow.flush_async_logging()
        mlflow.end_run("KILLED")
        raise
    except BaseException as error:
        with contextlib.suppress(Exception):  # best effort: the store itself may be what failed
            mlflow.set_tag(FAILURE_TAG, failure_reason(error))
        mlflow.flush_async_logging()
        mlflow.end_run("FAILED")
        raise
    mlflow.flush_async_logging()
    mlflow.end_run("FINISHED")


def failure_reason(error: BaseException) -> str:
    """One line saying what went wrong: the error's type and the first line of its message."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}"[:500]


def log_prepared_dataset(experiment: str, source: Path, output: Path, params: dict[str, Any], info: DatasetInfo) -> str:
    """Record a `classifier prepare` run: settings, counts per split and class, skipped images, the manifest
    and dataset.json as artifacts, and the manifest as the run's dataset input (lineage). Returns the run id."""
    connect()
    with start_run(experiment, run_name=f"prepare {output.name}", tags={"classifier.command": "prepare"}) as run:
        settings = {key: value for key, value in params.items() if key != "experiment"}
        settings.update(source=source, output=output, fingerprint=info.fingerprint)
        log_params(settings)
        table = read_manifest(output)
        counts = {f"images_{split}": images for split, images in images_per_split(table).items()}
        for split, per_class in info.counts.items():  # multi-label: images holding the class
            counts.update({_metric_name(f"images_{split}_{label}"): n for label, n in per_class.items()})
        mlflow.log_metrics({**counts, "images_skipped": len(info.skipped)})
        mlflow.log_artifact(str(output / MANIFEST_FILE), "dataset")
        mlflow.log_artifact(str(output / INFO_FILE), "dataset")
        # An explicit source: a path string matches two registered local sources, and MLflow warns that it is ambiguous
        location = LocalArtifactDatasetSource(str(output.resolve()))
        with warnings.catch_warnings():
            if not verbose():  # the fold column is an integer one; nobody infers a model schema from the manifest
                warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            manifest = mlflow.data.from_pandas(table, source=location, targets="label", name=output.name)
            mlflow.log_input(manifest, context="prepare")
    return run.info.run_id


def _metric_name(name: str) -> str:
    """MLflow metric keys allow letters, digits and _ - . / : and spaces only."""
    return re.sub(r"[^\w\-./: ]", "_", name)


CHAMPION_ALIAS = "champion"


END_REASON_TAG = "classifier.end_reason"


def running_runs(experiment: str, tags: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the RUNNING runs of `experiment` carrying all `tags`."""
    conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()] + ["attributes.status = 'RUNNING'"]
    runs = mlflow.MlflowClient().search_runs([experiment], filter_string=" and ".join(conditions))
    return [(run.info.run_id, run.data.tags) for run in runs]


def end_runs(run_ids: list[str], reason: str, status: str = "FAILED") -> None:
    """End runs nobody will end (their process died) as `status`, the tag `classifier.end_reason` saying why."""
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        client.set_tag(run_id, END_REASON_TAG, reason)
        client.set_terminated(run_id, status)


def end_orphan_runs(experiment: str, tags: dict[str, str], reason: str, status: str = "FAILED") -> list[str]:
    """End the RUNNING runs of `experiment` carrying all `tags` (a dead worker's trial); return their ids."""
    run_ids = [run_id for run_id, _ in running_runs(experiment, tags)]
    end_runs(run_ids, reason, status)
    return run_ids


def log_summary(run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, Any]) -> None:
    """Log a finished search's figures to `run_id` in one call."""
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(key, float(value), now, 0) for key, value in metrics.items()],
        params=[mlflow.entities.Param(key, str(value)) for key, value in params.items()],
        tags=[mlflow.entities.RunTag(key, str(value)) for key, value in tags.items()],
    )


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    """Store a matplotlib figure as an artifact of `run_id`."""
    mlflow.MlflowClient().log_figure(run_id, figure, artifact_file)


def register_champion(
    model_uri: str, name: str, metric: str, value: float, maximize: bool, tags: dict[str, Any]
) -> str | None:
    """Register `model_uri` as `name@champion` unless the current champion scored as well on `metric`.

    Returns the new version, or None when the champion stays. The score lives in the version tags `metric`/`value`.
    """
    client = mlflow.MlflowClient()
    if client.search_registered_models(filter_string=f"name = '{name}'"):
        if any(version.source == model_uri for version in client.search_model_versions(f"name = '{name}'")):
            return None  # already registered (by another worker of the same study)
        champion = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
        if champion is not None:
            current = client.get_model_version(name, champion).tags
            if current.get("metric") == metric and "value" in current:
                held = float(current["value"])
                if (value <= held) if maximize else (value >= held):
                    return None
    version_tags = {**tags, "metric": metric, "value": repr(float(value))}
    version = mlflow.register_model(model_uri, name, tags={key: str(item) for key, item in version_tags.items()})
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    return version.version


PARAM_TAG = "classifier.param."


def log_params(params: dict[str, Any]) -> None:
    """Log the active run's parameters in one batched call (values as strings, cut to MLflow's limit).

    Keys the run has already (`mlflow run` logs the `-P` values as given) keep their value: MLflow refuses to change
    a parameter and would drop the whole batch. Where ours differs (`-P lr=1e-2`, resolved 0.01), it becomes the tag
    `classifier.param.KEY`."""
    values = {key: str(value)[:6000] for key, value in params.items()}
    logged = mlflow.get_run(active_run_id()).data.params
    mlflow.log_params({key: value for key, value in values.items() if key not in logged}, synchronous=False)
    differing = {PARAM_TAG + key: value for key, value in values.items() if logged.get(key, value) != value}
    if differing:
        mlflow.set_tags(differing, synchronous=False)


def log_metrics(
    metrics: dict[str, float], step: int | None = None, run_id: str | None = None, model_id: str | None = None
) -> None:
    """Queue metrics for the active run (or `run_id`) as one asynchronous batch; with `model_id`, linked to that
    LoggedModel too, so that the UI's Models view (and `mlflow.search_logged_models`) ranks models by them."""
    mlflow.log_metrics(metrics, step=step, run_id=run_id, model_id=model_id, synchronous=False)


def flush() -> None:
    """Wait until every queued asynchronous metric, param and tag is stored."""
    mlflow.flush_async_logging()


def log_artifacts(folder: Path, artifact_path: str | None = None) -> None:
    """Upload every file under `folder` to the active run."""
    mlflow.log_artifacts(str(folder), artifact_path)


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def active_run_name() -> str:
    """The active run's name (given, or the one MLflow made up), as the UI lists it."""
    return mlflow.active_run().info.run_name


def run_info(run_id: str) -> tuple[str, str, dict[str, str]]:
    """(experiment id, status, tags) of `run_id`, or a UserError when there is no such run."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise UserError(f"run {run_id} not found at {tracking_uri()}; check --resume / MLFLOW_TRACKING_URI") from error
    return run.info.experiment_id, run.info.status, run.data.tags


def unfinished_run(experiment: str, tags: dict[str, str]) -> str | None:
    """The latest run of `experiment` carrying `tags` that did not finish (killed, failed or never ended)."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    conditions.append("attributes.status != 'FINISHED'")
    runs = mlflow.MlflowClient().search_runs(
        [found.experiment_id], " and ".join(conditions), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def download_artifact(run_id: str, path: str, destination: Path) -> Path | None:
    """Fetch artifact `path` of `run_id` into `destination`; None when the run has no such artifact."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(destination)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def download_model(model_uri: str, destination: Path) -> Path:
    """Fetch the files of a logged model (`models:/...`, `runs:/...`, or any MLflow artifact URI)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise UserError(f"{model_uri}: cannot fetch the model ({str(error).splitlines()[0][:200]})") from error


def model_run_id(model_uri: str) -> str | None:
    """The run that logged the model at `model_uri` (runs:/..., models:/NAME@ALIAS, models:/NAME/VERSION)."""
    try:
        return mlflow.models.get_model_info(model_uri).run_id
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise UserError(f"{model_uri}: cannot find the model's run ({str(error).splitlines()[0][:200]})") from error


def log_artifact_to_run(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Upload one file to `run_id` (finished or not) under `artifact_path`."""
    mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)


def try_log_artifacts(run_id: str, paths: list[Path], artifact_path: str) -> str | None:
    """Upload `paths` to `run_id` under `artifact_path`; None, or why the store refused (the caller goes on)."""
    try:
        for path in paths:
            mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)
    except (mlflow.exceptions.MlflowException, OSError, requests.RequestException) as error:
        return str(error).splitlines()[0][:200]
    return None


def try_delete_artifact(run_id: str, path: str) -> str | None:
    """Remove artifact `path` (a file or folder) of `run_id` from the artifact store (nothing when it is not there);
    None, or why the store refused."""
    try:
        artifact_uri = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
        get_artifact_repository(artifact_uri).delete_artifacts(path)
    except (mlflow.exceptions.MlflowException, OSError, requests.RequestException) as error:
        return str(error).splitlines()[0][:200]
    return None
