"""Watching a study: one progress line for N workers, system metrics on the study's run (not per trial), Optuna plots
refreshed while it runs, and optuna-dashboard opening the default journal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wsgiref.util
from pathlib import Path

import mlflow
import optuna
import optuna_dashboard
import pytest
import yaml
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier import tracking
from classifier.tune.search import PLOTS, PlotRefresh, WorkerJob
from classifier.tune.storage import JOURNAL_FILE, open_storage

TINY_TRAIN = {"epochs": 1, "batch_size": 8, "model": "simple_cnn", "num_workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    counts = {"benign": 12, "malignant": 12}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


@pytest.mark.slow
def test_two_workers_show_one_progress_line_and_no_trial_samples_system_metrics(tmp_path, dataset):
    config = tmp_path / "experiment.yaml"
    search = {"n_trials": 3, "n_workers": 2, "threads_per_worker": 1, "pruner": "none", "study_name": "watched"}
    config.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "experiment": "watch"}, "search": search}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    command = [str(Path(sys.executable).parent / "classifier"), "search", str(dataset), "--config", str(config)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "study watched" in done.stderr  # the launcher's line: trials done, pruned, failed, best
    assert "training:" not in done.stderr and "epochs:" not in done.stderr, "workers' bars interleave with it"
    study = optuna.load_study(study_name="watched", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 3
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["watch"], output_format="list")
    (parent,) = [run for run in runs if run.info.run_name == "search watched"]
    trials = [run for run in runs if run.info.run_name.startswith("trial-")]
    assert len(trials) == 3
    assert not [key for trial in trials for key in trial.data.metrics if key.startswith("system/")]


def test_plots_are_refreshed_on_the_study_run_every_few_trials(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "watch.journal")), study_name="plots")
    with tracking.start_run("watch", "search plots") as parent:
        refresh = PlotRefresh(WorkerJob(tmp_path, None, None, "plots", "value", parent.info.run_id), every=3)
        study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=2, callbacks=[refresh])
        assert mlflow.MlflowClient().list_artifacts(parent.info.run_id, "optuna") == []
        study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=1, callbacks=[refresh])
        drawn = {item.path for item in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "optuna")}
    assert drawn == {f"optuna/{name}.png" for name in PLOTS}


def test_optuna_dashboard_opens_the_default_journal(tmp_path):
    journal = tmp_path / JOURNAL_FILE
    study = optuna.create_study(storage=open_storage(str(journal)), study_name="dashboard")
    study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)

    app = optuna_dashboard.wsgi(str(journal))  # the loader `optuna-dashboard optuna.journal` uses
    environ = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    statuses = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))

    assert statuses == ["200 OK"]
    (summary,) = json.loads(body)["study_summaries"]
    assert summary["study_name"] == "dashboard"
