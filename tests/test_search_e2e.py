"""A real study end to end: `mlflow run . -e search`, nested runs and the champion read back from a tracking server."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from conftest import REPO
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.tune.search import search

pytestmark = pytest.mark.slow

TINY_TRAIN = {"epochs": 2, "batch_size": 8, "model": "simple_cnn", "system_metrics": False, "num_workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared two-class dataset (16 px, half training, half validation), shared by this module's tests."""
    counts = {"benign": 16, "malignant": 16}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


def trial_runs(client: mlflow.MlflowClient, study: str) -> list:
    runs = client.search_runs(
        [experiment.experiment_id for experiment in client.search_experiments()],
        filter_string=f"tags.optuna_study = '{study}'",
    )
    return [run for run in runs if "optuna_trial" in run.data.tags]


def test_mlflow_run_search_nests_trials_registers_champion_and_resumes(tmp_path, dataset, mlflow_server):
    model_name = f"champion-{tmp_path.name}"
    config = tmp_path / "experiment.yaml"
    search_section = {
        "n_trials": 2,
        "pruner": "none",
        "register_as": model_name,
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    config.write_text(yaml.safe_dump({"train": TINY_TRAIN, "search": search_section}))
    journal = tmp_path / "optuna.journal"
    command = [
        *(sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "search", "--env-manager", "local"),
        *("--experiment-name", f"search-{tmp_path.name}"),
        *("-P", f"data={dataset}", "-P", f"config={config}", "-P", f"storage={journal}", "-P", "study_name=e2e"),
    ]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `classifier` for MLproject's command
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    subprocess.run(command, check=True, cwd=tmp_path, env=env, timeout=300)

    study = optuna.load_study(
        study_name="e2e",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 2
    client = mlflow.MlflowClient(mlflow_server)
    runs = trial_runs(client, "e2e")
    assert sorted(run.data.tags["optuna_trial"] for run in runs) == ["0", "1"]
    parents = {run.data.tags["mlflow.parentRunId"] for run in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["optuna_study"] == "e2e" and parent.info.status == "FINISHED"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_roc_auc")) == 2
        assert float(run.data.params["lr"]) == pytest.approx(
            study.trials[int(run.data.tags["optuna_trial"])].params["lr"]
        )
    assert parent.data.metrics["best_val_log_loss"] == pytest.approx(study.best_value)
    plots = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/intermediate_values.png"} <= plots

    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.tags["study"] == "e2e"
    assert champion.tags["trial"] == str(study.best_trial.number)
    assert float(champion.tags["value"]) == pytest.approx(study.best_value)
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]

    # The same command again resumes the finished study: no new trial, no new version, champion unchanged.
    subprocess.run(command, check=True, cwd=tmp_path, env=env, timeout=300)
    assert len(optuna.load_study(study_name="e2e", storage=study._storage).trials) == 2
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    assert len(trial_runs(client, "e2e")) == 2


def test_hopeless_learning_rates_are_pruned_and_their_runs_killed(tmp_path, dataset):
    train = build_config(TrainConfig, TINY_TRAIN)
    sane = build_config(
        SearchConfig,
        {
            "study_name": "pruning",
            "objective": "val_loss",
            "n_trials": 2,
            "startup_trials": 2,
            "prune_warmup_epochs": 0,
            "space": {"lr": {"type": "float", "low": 3e-3, "high": 1e-2}},
        },
    )
    search(sane, train, dataset)
    hopeless = dataclasses.replace(sane, n_trials=4, space={"lr": {"type": "float", "low": 1e-9, "high": 1e-8}})
    result = search(hopeless, train, dataset)

    assert result.counts["complete"] == 2 and result.counts["pruned"] == 2
    client = mlflow.MlflowClient()
    for run in trial_runs(client, "pruning"):
        trial = int(run.data.tags["optuna_trial"])
        assert run.info.status == ("FINISHED" if trial < 2 else "KILLED")
        epochs = len(client.get_metric_history(run.info.run_id, "val_loss"))
        assert epochs == 2 if trial < 2 else epochs < 2
