"""The champion of a cross-validated search, built as AutoML tools build theirs: the best configuration's fold
models averaged into one ensemble, its threshold tuned on their out-of-fold predictions."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier import tracking
from classifier.config import DEFAULT_THRESHOLD_RULE, ThresholdRule
from classifier.data.dataset import load_split
from classifier.data.layout import positive_index, read_info
from classifier.learn.device import resolve_device
from classifier.learn.inference import load_checkpoint, predict_split
from classifier.learn.train import metric_name
from classifier.measure.metrics import classification_metrics
from classifier.measure.plots import write_report
from classifier.measure.threshold import choose_threshold, choose_thresholds, few_images_warning, prevalence
from classifier.model.pyfunc import log_classifier_model
from classifier.nets.ensemble import combine

FOLD_RUNS_ATTR = "fold_run_ids"  # a cross-validated trial's user attr: its fold runs, fold 0 first


def refit_folds(
    data: Path, fold_runs: list[str], experiment: str, parent_run_id: str, trial: int, batch_size: int = 256
) -> str:
    """Log the fold models of `fold_runs` (fold k's run validated on fold k) as one ensemble model in a run nested
    under `parent_run_id`, scored on their out-of-fold predictions; return the model's URI."""
    info = read_info(data)
    training = load_split(data, "training")
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = [load_checkpoint(run, Path(scratch) / run) for run in fold_runs]
    labels, probabilities = out_of_fold(checkpoints, training, batch_size, device)
    augment = (checkpoints[0].get("config") or {}).get("augment", "light")  # one configuration: TTA follows it
    ensemble = combine(checkpoints, fold_runs, {"refit": "folds", "trial": trial, "augment": augment})
    positive = positive_index(info.classes, ensemble["positive_class"], info.task)
    rule = ThresholdRule.parse((checkpoints[0].get("config") or {}).get("threshold_rule") or DEFAULT_THRESHOLD_RULE)
    ensemble.update(out_of_fold_threshold(labels, probabilities, info.classes, positive, info.task, rule))
    scores = classification_metrics(labels, probabilities, info.classes, ensemble["threshold"], positive)
    tags = {"classifier.command": "refit", "classifier.data": str(Path(data).resolve())}
    with tracking.start_run(experiment, f"refit-folds-trial-{trial}", tags, parent_run_id):
        tracking.log_params({"refit": "folds", "refit_trial": trial, "refit_members": ",".join(fold_runs)})
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            shows = f"out-of-fold predictions of trial {trial}'s {len(fold_runs)} fold models"
            report = folder / "evaluation"
            write_report(report, labels, probabilities, info.classes, ensemble["threshold"], positive, shows)
            tracking.log_artifacts(folder)
            torch.save(ensemble, folder / "ensemble.pt")
            model = log_classifier_model(folder / "ensemble.pt", name="model", metadata={"members": fold_runs})
            oof_scores = {metric_name(f"oof_{name}"): value for name, value in scores.items()}
            tracking.log_metrics(oof_scores, model_id=model.model_id)  # the model's scores in the Models view
            return model.model_uri


def out_of_fold(
    checkpoints: list[dict[str, Any]], training: Any, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every training image from the fold model that never trained on it."""
    labels, probabilities = [], []
    for fold, checkpoint in enumerate(checkpoints):
        rows = np.flatnonzero(training.folds == fold)
        fold_labels, fold_probabilities = predict_split(checkpoint, training, batch_size, device, rows=rows)
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
