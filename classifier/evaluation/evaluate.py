"""evaluate(config, model, data): score a trained model on a prepared split, with bootstrap CIs (over the manifest's
groups, patients or lesions, where it has them), logged to MLflow."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from classifier import tracking
from classifier.config import EvaluateConfig
from classifier.data.layout import positive_index
from classifier.data.transforms import uses_tta
from classifier.learn.device import resolve_device
from classifier.learn.explained import log_explained_grid
from classifier.learn.inference import checkpoint_and_split, predict_split
from classifier.learn.train import metric_name
from classifier.measure.metrics import BOOTSTRAPPED, absent_classes, bootstrap_intervals, classification_metrics
from classifier.measure.plots import write_report
from classifier.measure.threshold import prevalence


@dataclass
class EvaluationResult:
    """The evaluation run, its metrics (accuracy, roc_auc, ...), 95% intervals of the bootstrapped ones, and the
    classes without images in the split (left out of the metrics: their per-class scores are nan)."""

    run_id: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    absent: list[str]


def evaluate(config: EvaluateConfig, model: str, data: Path) -> EvaluationResult:
    """Score `model` (checkpoint file, run id, or MLflow model URI) on `config.split` of the prepared `data`."""
    data = Path(data)
    info, checkpoint, arrays = checkpoint_and_split(model, data, config.split)
    device = resolve_device(config.device)
    tta = uses_tta(checkpoint, config.tta)
    labels, probabilities = predict_split(checkpoint, arrays, config.batch_size, device, tta)
    thresholds = checkpoint.get("threshold")
    positive = positive_index(info.classes, checkpoint.get("positive_class"), checkpoint.get("task"))
    scores = classification_metrics(labels, probabilities, info.classes, thresholds, positive)
    intervals = {}
    groups = arrays.rows["group"].astype(str).tolist()
    groups = groups if any(groups) else None  # patients or lesions named at prepare (--group-column)
    if config.bootstrap:
        intervals = bootstrap_intervals(
            labels, probabilities, info.classes, config.bootstrap, config.seed, thresholds, positive, groups
        )
    tags = {"classifier.evaluated_model": model, "classifier.data": str(data.resolve())}
    if positive is not None:
        tags["classifier.positive_class"] = info.classes[positive]
    with tracking.start_run(config.experiment, f"evaluate-{config.split}", tags):
        tracking.log_params(
            {
                "evaluated_model": model,
                "evaluated_data": str(data),
                "evaluated_split": config.split,
                "evaluated_tta": tta,
                "bootstrap_resamples": "images" if groups is None else "groups",
            }
        )
        logged = {metric_name(f"{config.split}_{key}"): value for key, value in scores.items()}
        if positive is not None:  # beside the model's threshold_prevalence: the mix it was tuned on
            logged[f"{config.split}_prevalence"] = prevalence(labels == positive)
        for key, (low, high) in intervals.items():
            logged[f"{config.split}_{key}_ci_low"], logged[f"{config.split}_{key}_ci_high"] = low, high
        tracking.log_metrics(logged)
        with tempfile.TemporaryDirectory() as scratch:
            shows = f"{config.split} split, model {model}"
            write_report(Path(scratch), labels, probabilities, info.classes, thresholds, positive, shows)
            tracking.log_artifacts(Path(scratch), "evaluation")
        log_explained_grid(checkpoint, arrays, labels, probabilities, device)  # evaluation/explained.png
        run_id = tracking.active_run_id()
    shown = {key: intervals[key] for key in BOOTSTRAPPED if key in intervals}
    return EvaluationResult(run_id, scores, shown, absent_classes(labels, info.classes))
