"""`mlflow run . -e NAME -P ...`: undeclared parameters reach the CLI as options, and the run keeps every param."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import mlflow
import pytest
import yaml
from conftest import REPO
from mlflow.projects._project_spec import load_project
from prepared import prepared_dataset

from classifier import tracking
from classifier.cli import main
from classifier.data.layout import read_info


def cli_options(command_line: str) -> dict[str, Any]:
    """What the `classifier` CLI makes of a command line, without running the command."""
    program, name, *arguments = shlex.split(command_line)
    group = click.Context(main, info_name=program, **main.context_settings)
    return main.get_command(group, name).make_context(name, arguments, parent=group).params


def test_undeclared_parameters_become_the_options_they_name(tmp_path: Path) -> None:
    parameters = {"data": str(tmp_path), "batch_size": "8", "lr": "1e-2", "pretrained": "true", "loss": "cross_entropy"}

    command_line = load_project(REPO).get_entry_point("train").compute_command(parameters, str(tmp_path / "storage"))
    options = cli_options(command_line)

    assert "--batch_size 8" in command_line  # how MLflow appends an undeclared parameter
    assert options["data"] == tmp_path and options["config_path"] is None
    given = (options["batch_size"], options["lr"], options["pretrained"], options["loss"])
    assert given == (8, 0.01, True, "cross_entropy")
    assert options["epochs"] is None and options["model"] is None  # not given: left to the config and defaults


def test_mlproject_declares_only_arguments_and_config() -> None:
    for name, entry in yaml.safe_load((REPO / "MLproject").read_text())["entry_points"].items():
        assert set(entry["parameters"]) <= {"data", "source", "output", "model", "path", "config"}, name


def test_log_params_keeps_what_the_run_has_and_logs_the_rest() -> None:
    with tracking.start_run("params") as run:
        mlflow.log_params({"lr": "1e-2", "epochs": "3"}, synchronous=True)  # as `mlflow run` logs its -P values
        tracking.log_params({"lr": 0.01, "epochs": 3, "model": "simple_cnn"})

    logged = mlflow.get_run(run.info.run_id).data
    assert logged.params == {"lr": "1e-2", "epochs": "3", "model": "simple_cnn"}
    assert {key: value for key, value in logged.tags.items() if key.startswith(tracking.PARAM_TAG)} == {
        "classifier.param.lr": "0.01"
    }


@pytest.mark.slow
def test_mlflow_run_train_logs_the_resolved_parameters(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path / "dataset", {"benign": 20, "malignant": 20}, mode="L")
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local"]
    command += ["--experiment-name", "entry", "-P", f"data={data}", "-P", "epochs=1", "-P", "batch_size=8"]
    command += ["-P", "model=simple_cnn", "-P", "pretrained=false"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `classifier` for MLproject's command
    process = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=300
    )

    assert process.returncode == 0, process.stderr[-3000:]
    assert "Changing param values is not allowed" not in process.stderr
    (run,) = mlflow.search_runs(experiment_names=["entry"], output_format="list")
    params = run.data.params
    assert (params["epochs"], params["batch_size"], params["model"]) == ("1", "8", "simple_cnn")  # as given
    assert (params["lr"], params["augment"]) == ("0.001", "light")  # resolved: the batch was not dropped
    assert params["data_fingerprint"] == read_info(data).fingerprint
    assert params["pretrained"] == "false" and run.data.tags["classifier.param.pretrained"] == "False"
