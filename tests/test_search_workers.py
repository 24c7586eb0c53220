"""The docker-compose topology without Docker: PostgreSQL, an `mlflow server` with basic-auth on PostgreSQL + S3
(moto), workers signing in as docker-compose.yml's do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import optuna
import psycopg2
import pytest
import yaml
from conftest import REPO, free_port, requires_postgres, wait_for_http
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier.tune.search import SKIPPED_ATTR
from classifier.tune.storage import open_storage

pytestmark = [pytest.mark.slow, requires_postgres]

USER = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a-test-password-long-enough"}
TINY_TRAIN = {"epochs": 2, "batch_size": 8, "model": "simple_cnn", "system_metrics": False, "num_workers": 0}
CLASSIFIER = [str(Path(sys.executable).parent / "classifier")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared two-class dataset (16 px, half training, half validation), shared by this module's tests."""
    counts = {"benign": 16, "malignant": 16}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


def create_database() -> str:
    """A throwaway PostgreSQL database; returns its SQLAlchemy URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    connection = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    connection.close()


@pytest.fixture
def optuna_database() -> Iterator[str]:
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture
def s3_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """moto's S3 server with a bucket, and an `mlflow server` with basic-auth (as docker-compose.yml runs it) storing
    runs in PostgreSQL and artifacts in S3; this test process signs in as the workers do."""
    s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3_port, mlflow_port = free_port(), free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    backend = create_database().replace("postgresql://", "postgresql+psycopg2://")  # mlflow defaults to psycopg 3
    log = open(tmp_path / "servers.log", "wb")  # noqa: SIM115 - closed with the processes
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(s3_port)], stdout=log, stderr=subprocess.STDOUT
    )
    server = None
    try:
        wait_for_http(f"{s3_url}/moto-api/", moto)
        boto3.client("s3", endpoint_url=s3_url, **_boto(s3_env)).create_bucket(Bucket="mlflow")
        auth = tmp_path / "basic_auth.ini"
        auth.write_text(
            (REPO / "docker" / "basic_auth.ini").read_text().replace("/auth/", f"{tmp_path}/")
        )  # the compose file's auth settings, its user database here
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"),
            *("--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
            *("--backend-store-uri", backend, "--artifacts-destination", "s3://mlflow/artifacts"),
        ]
        env = {**os.environ, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_AUTH_CONFIG_PATH": str(auth)}
        env |= {"MLFLOW_AUTH_ADMIN_USERNAME": USER["MLFLOW_TRACKING_USERNAME"], "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = USER["MLFLOW_TRACKING_PASSWORD"]
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        wait_for_http(f"http://127.0.0.1:{mlflow_port}/health", server)
        for name, value in USER.items():
            monkeypatch.setenv(name, value)
        yield f"http://127.0.0.1:{mlflow_port}", s3_url
    finally:
        for process in (server, moto):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        log.close()
        drop_database(backend)


def _boto(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def write_config(path: Path, search: dict, train: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, **(train or {})}, "search": search}))
    return path


def test_two_workers_on_postgres_share_one_study(tmp_path, dataset, optuna_database, s3_mlflow_server):
    tracking_uri, s3_url = s3_mlflow_server
    config = write_config(
        tmp_path / "experiment.yaml",
        {"n_trials": 3, "pruner": "none", "register_as": f"shared-{tmp_path.name}", "threads_per_worker": 1},
        {"epochs": 1},
    )
    command = [*CLASSIFIER, "search", str(dataset), "--config", str(config), "--storage", optuna_database]
    anonymous = {name: value for name, value in os.environ.items() if name not in USER}
    refused = subprocess.run(command, env={**anonymous, "MLFLOW_TRACKING_URI": tracking_uri}, capture_output=True)
    assert refused.returncode == 1 and b"refuses these credentials (401)" in refused.stderr  # authentication is on
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}  # with the workers' user, as in docker-compose.yml
    # Like two `worker` containers: two processes started together on one study.
    workers = [
        subprocess.Popen([*command, "--study-name", "shared"], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr.decode()[-2000:]

    study = optuna.load_study(study_name="shared", storage=open_storage(optuna_database))
    # both workers may claim the last place at once: the later trial is skipped unrun (FAILED, `skipped`), not failed
    ran = [trial for trial in study.trials if not trial.user_attrs.get(SKIPPED_ATTR)]
    assert [trial.state for trial in ran] == [TrialState.COMPLETE] * 3
    assert all(trial.state == TrialState.FAIL for trial in study.trials if trial not in ran)
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("classifier").experiment_id],
        filter_string="tags.optuna_study = 'shared'",
    )
    trial_numbers = [run.data.tags["optuna_trial"] for run in runs if "optuna_trial" in run.data.tags]
    assert sorted(trial_numbers) == sorted(str(trial.number) for trial in ran)
    assert {trial.user_attrs["mlflow_run_id"] for trial in ran} == {
        run.info.run_id for run in runs if "optuna_trial" in run.data.tags
    }
    champion = client.get_model_version_by_alias(f"shared-{tmp_path.name}", "champion")
    assert champion.tags["trial"] == str(study.best_trial.number)
    stored = boto3.client(
        "s3", endpoint_url=s3_url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).list_objects_v2(Bucket="mlflow")
    assert any(item["Key"].endswith("MLmodel") for item in stored.get("Contents", []))


def test_killed_worker_trial_is_failed_and_retried_on_resume(tmp_path, dataset, optuna_database):
    config = write_config(
        tmp_path / "experiment.yaml",
        {"n_trials": 1, "pruner": "none", "heartbeat_interval": 1, "grace_period": 3, "study_name": "killed"},
        {"epochs": 3},
    )
    command = [*CLASSIFIER, "search", str(dataset), "--config", str(config), "--storage", optuna_database]
    worker = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL)
    storage = open_storage(optuna_database)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        trials = optuna.load_study(study_name="killed", storage=storage).trials if _has_study(storage) else []
        if trials and trials[0].intermediate_values:
            break
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert optuna.load_study(study_name="killed", storage=storage).trials[0].state == TrialState.RUNNING
    time.sleep(4)  # past the grace period: the trial's heartbeat is stale

    subprocess.run(command, cwd=tmp_path, check=True, timeout=300)

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert trials[0].state == TrialState.FAIL
    retried = [trial for trial in trials if trial.user_attrs.get("retry_of") == 0]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[0].params
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("classifier").experiment_id], filter_string="tags.optuna_trial = '0'"
    )
    assert [run.info.status for run in runs] == ["FAILED"]


def _has_study(storage: optuna.storages.RDBStorage) -> bool:
    return any(summary.study_name == "killed" for summary in optuna.get_all_study_summaries(storage))
