"""docker-compose.yml (no Docker engine here): it parses and runs what the README's scale-out section describes."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from conftest import REPO

from classifier.cli import main

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


@pytest.fixture(scope="module")
def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Scale-out with Docker Compose\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Scale-out with Docker Compose' section"
    return match.group(1)


def command(service: str) -> list[str]:
    value = SERVICES[service]["command"]
    return shlex.split(value) if isinstance(value, str) else value


def option(arguments: list[str], name: str) -> str:
    return arguments[arguments.index(name) + 1]


def test_services_and_images_are_the_ones_the_readme_lists(readme_section):
    assert set(SERVICES) == {"postgres", "minio", "minio-init", "mlflow", "worker"}
    for name, service in SERVICES.items():
        row = next((line for line in readme_section.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"README table has no row for service {name}"
        assert f"`{service['image']}`" in row


def test_worker_runs_classifier_search_as_the_readme_says(readme_section):
    arguments = command("worker")
    assert arguments[:2] == ["classifier", "search"]
    assert " ".join(arguments[:7]) in readme_section
    known = {name for param in main.commands["search"].params for name in param.opts}
    assert {argument for argument in arguments if argument.startswith("--")} <= known
    assert (REPO / option(arguments, "--config")).is_file()
    assert option(arguments, "--storage").startswith("postgresql://")
    assert "--scale worker=" in readme_section


def test_workers_share_postgres_and_the_tracking_server():
    storage_database = option(command("worker"), "--storage").rsplit("/", 1)[1]
    assert f"CREATE DATABASE {storage_database};" in (REPO / "docker" / "postgres-init.sql").read_text()
    mlflow_arguments = command("mlflow")
    assert mlflow_arguments[:2] == ["mlflow", "server"]
    assert option(mlflow_arguments, "--backend-store-uri").startswith("postgresql")
    assert option(mlflow_arguments, "--artifacts-destination").startswith("s3://mlflow/")
    assert "mc mb --ignore-existing local/mlflow" in " ".join(SERVICES["minio-init"]["entrypoint"])
    port = option(mlflow_arguments, "--port")
    assert SERVICES["worker"]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
    assert SERVICES["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_worker_reserves_a_gpu_and_can_be_scaled():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in worker and "ports" not in worker  # both would break --scale worker=N


TEXT = (REPO / "docker-compose.yml").read_text()
VARIABLE = re.compile(r"\$\{(\w+)(:?[?-])?([^}]*)\}")
EXAMPLE = dict(
    line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines() if line and line[0] != "#"
)


def test_no_secret_has_a_default_and_compose_refuses_to_start_without_one():
    assert "minioadmin" not in TEXT and "classifier:classifier" not in TEXT
    used = {(name, mode) for name, mode, _ in VARIABLE.findall(TEXT)}
    required = {name for name, mode in used if mode == ":?"}
    assert {name for name, _ in used} - required == {"MLFLOW_PORT"}  # the only default: where MLflow is published
    assert required == {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    assert required <= set(EXAMPLE) and not any(EXAMPLE[name] for name in required)  # shipped empty
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_databases_stay_on_the_compose_network_and_mlflow_on_loopback_by_default():
    assert "ports" not in SERVICES["postgres"] and "ports" not in SERVICES["minio"]
    (published,) = SERVICES["mlflow"]["ports"]
    assert published.startswith("${MLFLOW_PORT:-127.0.0.1:5000}:")


def test_the_tracking_server_runs_basic_auth_and_workers_sign_in():
    arguments = command("mlflow")
    assert option(arguments, "--app-name") == "basic-auth"
    environment = SERVICES["mlflow"]["environment"]
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in environment
    config = environment["MLFLOW_AUTH_CONFIG_PATH"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in SERVICES["mlflow"]["volumes"]}
    assert (REPO / mounted[config]).is_file() and "database_uri = sqlite:////auth/" in (
        REPO / mounted[config]
    ).read_text()
    assert set(SERVICES["worker"]["environment"]) >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert "mlflow[auth]" in (REPO / "pyproject.toml").read_text()  # the image's server needs Flask-WTF
