"""A search built to generalise: trials ranked on the cross-validated log-loss, the champion the best configuration's
fold models as one ensemble (threshold from out-of-fold predictions), and a wall-time budget that ends the study."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.data.dataset import load_split
from classifier.errors import UserError
from classifier.learn.inference import load_checkpoint, predict_split
from classifier.learn.probe import epoch_seconds
from classifier.measure.threshold import choose_threshold
from classifier.nets.ensemble import ENSEMBLE
from classifier.tune.budget import EPOCHS_ATTR, MIN_FULL_TRIALS
from classifier.tune.refit import FOLD_EPOCHS_ATTR, FOLD_RUNS_ATTR
from classifier.tune.storage import JOURNAL_FILE, open_storage

pytestmark = pytest.mark.slow
TINY_TRAIN = {"epochs": 2, "batch_size": 8, "system_metrics": False, "num_workers": 0, "augment": "none"}


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images a class in 3 folds of the training split, plus a test split."""
    counts = {"benign": 20, "malignant": 20}
    return prepared_dataset(tmp_path_factory.mktemp("folded"), counts, folds=3, fractions=(0.8, 0.0, 0.2))


def search(tmp_path: Path, data: Path, search: dict, *args: str):
    config = tmp_path / "experiment.yaml"
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    config.write_text(yaml.safe_dump({"train": TINY_TRAIN, "search": {"study_name": "s", "space": space, **search}}))
    return CliRunner().invoke(main, ["search", str(data), "--config", str(config), *args])


def test_cross_validated_trials_rank_on_log_loss_and_the_champion_is_the_best_trials_fold_ensemble(
    tmp_path, folded, monkeypatch
):
    monkeypatch.chdir(tmp_path)

    result = search(tmp_path, folded, {"n_trials": 2, "cv_folds": 3, "pruner": "none"})

    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    assert study.user_attrs["metric"] == "val_log_loss" and study.direction.name == "MINIMIZE"
    best = study.best_trial
    fold_runs = best.user_attrs[FOLD_RUNS_ATTR]
    client = mlflow.MlflowClient()
    fold_losses = [client.get_run(run).data.metrics["best_val_log_loss"] for run in fold_runs]
    assert best.value == pytest.approx(np.mean(fold_losses))  # the objective is the folds' mean
    # the pruner sees fold means: fold k's epoch e at step 2k + e, averaged with the folds before it
    for fold, run in enumerate(fold_runs):
        last_epoch = client.get_metric_history(run, "val_log_loss")[-1].value
        fold_mean = (sum(fold_losses[:fold]) + last_epoch) / (fold + 1)
        assert best.intermediate_values[2 * fold + 1] == pytest.approx(fold_mean)

    champion = client.get_model_version_by_alias("s", "champion")
    checkpoint = load_checkpoint("models:/s@champion", tmp_path / "download")
    assert checkpoint["architecture"] == ENSEMBLE
    assert [member["source"] for member in checkpoint["config"]["members"]] == fold_runs
    assert champion.tags["value"] == repr(best.value)
    # The threshold comes from each image's prediction by the fold model that never trained on it
    assert checkpoint["threshold"] == pytest.approx(out_of_fold_threshold(folded, fold_runs, tmp_path), abs=1e-5)
    assert checkpoint["threshold_rule"] == "youden"
    assert checkpoint["threshold_prevalence"] == pytest.approx(0.5)
    refit = client.get_run(champion.run_id)
    assert (
        refit.data.tags["mlflow.parentRunId"]
        == client.get_run(best.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    )
    assert "oof_roc_auc" in refit.data.metrics


def out_of_fold_threshold(data: Path, fold_runs: list[str], tmp_path: Path) -> float:
    """The youden threshold on each training image's P(malignant) from the fold model that never trained on it."""
    training = load_split(data, "training")
    labels, scores = [], []
    for fold, run in enumerate(fold_runs):
        rows = np.flatnonzero(training.folds == fold)
        member = load_checkpoint(run, tmp_path / "download" / run)
        fold_labels, probabilities = predict_split(member, training, 64, torch.device("cpu"), rows=rows)
        labels.append(fold_labels)
        scores.append(probabilities[:, 1])
    return choose_threshold(np.concatenate(labels) == 1, np.concatenate(scores), "youden")


def test_a_full_refit_retrains_the_best_configuration_on_every_training_image(tmp_path, folded, monkeypatch):
    monkeypatch.chdir(tmp_path)

    result = search(tmp_path, folded, {"n_trials": 2, "cv_folds": 3, "pruner": "none", "refit": "full"})

    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    best = study.best_trial
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("s", "champion")
    refit = client.get_run(champion.run_id)
    epochs = round(np.mean(best.user_attrs[FOLD_EPOCHS_ATTR]))
    assert refit.data.params["refit"] == "full" and int(refit.data.params["refit_epochs"]) == epochs
    (training_run,) = client.search_runs([refit.info.experiment_id], f"tags.mlflow.parentRunId = '{refit.info.run_id}'")
    assert int(training_run.data.params["train_images"]) == len(load_split(folded, "training").labels)
    assert int(training_run.data.params["val_images"]) == 0
    assert len(client.get_metric_history(training_run.info.run_id, "train_loss")) == epochs
    assert float(training_run.data.params["lr"]) == pytest.approx(best.params["lr"])
    checkpoint = load_checkpoint("models:/s@champion", tmp_path / "download")
    assert checkpoint["architecture"] == "simple_cnn"
    expected = out_of_fold_threshold(folded, best.user_attrs[FOLD_RUNS_ATTR], tmp_path)
    assert checkpoint["threshold"] == pytest.approx(expected, abs=1e-5)
    assert checkpoint["threshold_prevalence"] == pytest.approx(0.5)
    # one copy of the weights: the refit's model, not also the training run's best.pt
    assert not client.list_artifacts(training_run.info.run_id, "checkpoints")
    assert not (tmp_path / "outputs" / training_run.info.run_id).exists()
    # a study whose trials ran before the folds' best epochs were recorded: one line, the way out named
    old = optuna.create_study(study_name="old", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    old.set_user_attr("metric", "val_log_loss")
    attrs = {FOLD_RUNS_ATTR: best.user_attrs[FOLD_RUNS_ATTR]}
    old.add_trial(
        optuna.trial.create_trial(params=best.params, distributions=best.distributions, value=0.1, user_attrs=attrs)
    )
    settings = {"study_name": "old", "n_trials": 1, "cv_folds": 3, "pruner": "none", "refit": "full"}
    again = search(tmp_path, folded, settings)
    assert again.exit_code == 1
    assert "trial 0 of study old ran before classifier recorded its folds' best epochs" in again.output
    assert "rerun with --refit folds" in again.output


def test_a_budget_ends_the_study_and_prunes_the_trial_it_cuts(tmp_path, folded, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()

    result = search(tmp_path, folded, {}, "--budget", "20s", "--epochs", "2000")

    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 20 + 30, "the budget covers the whole search (a trial is cut at its next epoch)"
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    (cut,) = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.PRUNED]
    assert 0 < len(cut.intermediate_values) < 2000
    assert EPOCHS_ATTR not in study.user_attrs  # --epochs: as many as asked, whatever the budget


def test_under_a_budget_the_epochs_per_trial_follow_from_a_timed_epoch(tmp_path, folded, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = {**TINY_TRAIN, "epochs": 100_000}
    config = tmp_path / "experiment.yaml"
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    config.write_text(yaml.safe_dump({"train": train, "search": {"study_name": "s", "space": space, "n_trials": 1}}))

    result = CliRunner().invoke(main, ["search", str(folded), "--config", str(config), "--budget", "30s"])

    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / JOURNAL_FILE)))
    epochs = study.user_attrs[EPOCHS_ATTR]
    assert 2 <= epochs < 100_000 and f"trials train up to {epochs} epochs" in result.output
    epoch = epoch_seconds(build_config(TrainConfig, train), folded)
    assert epochs * MIN_FULL_TRIALS * epoch < 2 * 27  # 8 whole trials fit the trials' 90% of 30 s (timing noise: 2x)
    (trial,) = study.trials
    client = mlflow.MlflowClient()
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.params["epochs"] == str(epochs)
    parent = client.get_run(client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"])
    assert parent.data.params[EPOCHS_ATTR] == str(epochs)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"budget": "an hour"}, "search: option 'budget': 'an hour' is not a duration; write e.g. 1h, 90m"),
        ({"refit": "folds"}, "search: refit 'folds' ensembles the best trial's fold models; set --cv-folds K too"),
        ({"refit": "full"}, "search: refit 'full' takes its epochs and threshold from the best trial's folds"),
    ],
)
def test_bad_budget_or_refit_is_one_line(values, message):
    with pytest.raises(UserError, match=message):
        build_config(SearchConfig, values)


def test_budget_durations_read_as_people_write_them():
    seconds = {text: build_config(SearchConfig, {"budget": text}).budget_seconds for text in ("1h", "90m", "2h30m")}
    assert seconds == {"1h": 3600, "90m": 5400, "2h30m": 9000}
    assert build_config(SearchConfig, {"budget": "1h"}).trial_limit is None  # as many trials as the budget allows
    assert build_config(SearchConfig, {}).trial_limit == 20
