"""The champion of a cross-validated search, built as AutoML tools build theirs: the best configuration's fold
models averaged into one ensemble, or that configuration retrained on every training image; either way its threshold
tuned on the fold models' out-of-fold predictions."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier import tracking
from classifier.config import DEFAULT_THRESHOLD_RULE, ThresholdRule, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.layout import positive_index, read_info
from classifier.data.transforms import uses_tta
from classifier.learn.device import resolve_device
from classifier.learn.inference import load_checkpoint, predict_split
from classifier.learn.train import discard_outputs, fit, metric_name
from classifier.measure.metrics import classification_metrics
from classifier.measure.plots import write_report
from classifier.measure.threshold import choose_threshold, choose_thresholds, few_images_warning, prevalence
from classifier.model.checkpoint import BEST
from classifier.model.pyfunc import log_classifier_model
from classifier.nets.ensemble import combine

FOLD_RUNS_ATTR = "fold_run_ids"  # a cross-validated trial's user attr: its fold runs, fold 0 first
FOLD_EPOCHS_ATTR = "fold_best_epochs"  # and each fold's best epoch (from 1)


def refit_folds(
    data: Path, fold_runs: list[str], experiment: str, parent_run_id: str, trial: int, batch_size: int = 256
) -> str:
    """Log the fold models of `fold_runs` (fold k's run validated on fold k) as one ensemble model in a run nested
    under `parent_run_id`, scored on their out-of-fold predictions; return the model's URI."""
    checkpoints, labels, probabilities = fold_predictions(data, fold_runs, batch_size)
    augment = (checkpoints[0].get("config") or {}).get("augment", "light")  # one configuration: TTA follows it
    ensemble = combine(checkpoints, fold_runs, {"refit": "folds", "trial": trial, "augment": augment})
    ensemble["tta"] = checkpoints[0].get("tta")  # as its members were tuned: the out-of-fold threshold follows it
    rule = (checkpoints[0].get("config") or {}).get("threshold_rule")
    with tracking.start_run(experiment, f"refit-folds-trial-{trial}", refit_tags(data), parent_run_id):
        tracking.log_params({"refit": "folds", "refit_trial": trial, "refit_members": ",".join(fold_runs)})
        shows = f"out-of-fold predictions of trial {trial}'s {len(fold_runs)} fold models"
        return log_refit_model(ensemble, "ensemble.pt", data, labels, probabilities, rule, shows, fold_runs)


def refit_full(
    config: TrainConfig,
    data: Path,
    fold_runs: list[str],
    fold_epochs: list[int],
    parent_run_id: str,
    trial: int,
    batch_size: int = 256,
) -> str:
    """Retrain trial `trial`'s configuration `config` on every training image for its folds' mean best epoch count,
    in a run nested under a refit run under `parent_run_id`; its threshold (and temperature, when the folds were
    calibrated) comes from the fold models' out-of-fold predictions, as no image is left to tune it on. Log it as the
    refit run's model and return the model's URI."""
    checkpoints, labels, probabilities = fold_predictions(data, fold_runs, batch_size)
    epochs = max(1, round(float(np.mean(fold_epochs))))
    config = dataclasses.replace(config, epochs=epochs, calibrate="none", system_metrics=False)
    with tracking.start_run(config.experiment, f"refit-full-trial-{trial}", refit_tags(data), parent_run_id) as run:
        tracking.log_params({"refit": "full", "refit_trial": trial, "refit_epochs": epochs})
        result = fit(
            config, data, parent_run_id=run.info.run_id, run_name=f"refit-full-trial-{trial}-training", validate=False
        )
        model = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
        temperatures = [checkpoint.get("temperature") for checkpoint in checkpoints]
        if None not in temperatures:  # the configuration calibrates: the folds' mean temperature, before the threshold
            model["temperature"] = float(np.mean(temperatures))
        shows = f"out-of-fold predictions of trial {trial}'s fold models (the full refit leaves no image out)"
        uri = log_refit_model(model, BEST, data, labels, probabilities, config.threshold_rule, shows, fold_runs)
    refused = tracking.try_delete_artifact(result.run_id, f"checkpoints/{BEST}")  # one copy: the refit's model
    if refused:
        print(f"refit: checkpoints/{BEST} stays in run {result.run_id} ({refused})", file=sys.stderr)
    discard_outputs(config, [result.run_id])
    return uri


def refit_tags(data: Path) -> dict[str, str]:
    return {"classifier.command": "refit", "classifier.data": str(Path(data).resolve())}


def fold_predictions(
    data: Path, fold_runs: list[str], batch_size: int
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """The fold runs' checkpoints (fold k's run validated on fold k) and their out-of-fold labels and
    probabilities (averaged over the recipe's flips when the configuration predicts with TTA)."""
    training = load_split(data, "training")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = [load_checkpoint(run, Path(scratch) / run) for run in fold_runs]
    tta = uses_tta(checkpoints[0])
    labels, probabilities = out_of_fold(checkpoints, training, batch_size, resolve_device("auto"), tta)
    return checkpoints, labels, probabilities


def log_refit_model(
    model: dict[str, Any],
    file_name: str,
    data: Path,
    labels: np.ndarray,
    probabilities: np.ndarray,
    rule: str | None,
    shows: str,
    members: list[str],
) -> str:
    """Give the checkpoint `model` the threshold(s) that `rule` picks on the out-of-fold predictions, write their
    report, and log it as the active run's model, its out-of-fold scores linked; return the model's URI."""
    info = read_info(data)
    positive = positive_index(info.classes, model["positive_class"], info.task)
    rule = ThresholdRule.parse(rule or DEFAULT_THRESHOLD_RULE)
    model.update(out_of_fold_threshold(labels, probabilities, info.classes, positive, info.task, rule))
    scores = classification_metrics(labels, probabilities, info.classes, model["threshold"], positive)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_report(folder / "evaluation", labels, probabilities, info.classes, model["threshold"], positive, shows)
        tracking.log_artifacts(folder)
        torch.save(model, folder / file_name)
        logged = log_classifier_model(folder / file_name, name="model", metadata={"members": members})
    oof_scores = {metric_name(f"oof_{name}"): value for name, value in scores.items()}
    tracking.log_metrics(oof_scores, model_id=logged.model_id)  # the model's scores in the Models view
    return logged.model_uri


def out_of_fold(
    checkpoints: list[dict[str, Any]], training: Any, batch_size: int, device: torch.device, tta: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every training image from the fold model that never trained on it."""
    labels, probabilities = [], []
    for fold, checkpoint in enumerate(checkpoints):
        rows = np.flatnonzero(training.folds == fold)
        fold_labels, fold_probabilities = predict_split(checkpoint, training, batch_size, device, tta, rows)
        labels.append(fold_labels)
        probabilities.append(fold_probabilities)
    return np.concatenate(labels), np.concatenate(probabilities)


def out_of_fold_threshold(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    positive: int | None,
    task: str,
    rule: ThresholdRule,
) -> dict[str, Any]:
    """The ensemble's threshold(s), rule and prevalence from out-of-fold predictions (none for argmax models).

    Each image's probability comes from one fold model rather than from the average of all of them, which is a little
    less confident: the threshold errs towards what a single fold model would decide."""
    if task == "multi_label":
        threshold, truth = choose_thresholds(labels, probabilities, rule), labels
    elif positive is not None and np.unique(labels).size == 2:
        truth = labels == positive
        threshold = choose_threshold(truth, probabilities[:, positive], rule)
    else:
        return {"threshold": None}
    warning = few_images_warning(labels, classes, threshold)
    if warning:
        print(f"refit: {warning}", file=sys.stderr)
    return {"threshold": threshold, "threshold_rule": str(rule), "threshold_prevalence": prevalence(truth)}
