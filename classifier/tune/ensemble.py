"""build_ensemble(config, data): average the probabilities of a study's top trials (or given runs) into one model,
score it beside its members on a split in one MLflow run, and log (and optionally register) it as a pyfunc model."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.study import StudyDirection
from optuna.trial import TrialState

from classifier import tracking
from classifier.config import DEFAULT_THRESHOLD_RULE, EnsembleConfig, ThresholdRule
from classifier.data.dataset import SplitArrays, load_split
from classifier.data.layout import DatasetInfo, positive_index, read_info
from classifier.errors import UserError
from classifier.learn.device import resolve_device
from classifier.learn.inference import load_checkpoint, predict_split, read_split
from classifier.learn.train import metric_name
from classifier.measure.metrics import classification_metrics
from classifier.measure.plots import write_report
from classifier.measure.threshold import choose_threshold, choose_thresholds, few_images_warning, prevalence
from classifier.model.checkpoint import check_fits, stored_threshold_rule
from classifier.model.pyfunc import log_classifier_model
from classifier.nets.ensemble import combine
from classifier.tune.storage import default_storage, open_storage

COMPARISON_FILE = "comparison.csv"


@dataclass
class EnsembleResult:
    """The ensemble's run and model, its decision threshold, and the split's scores of it and each member."""

    run_id: str
    model_uri: str
    threshold: float | list[float] | None
    table: pd.DataFrame  # one row per model, the ensemble first: model, source, architecture, metrics
    registered_version: str | None


def build_ensemble(config: EnsembleConfig, data: Path) -> EnsembleResult:
    """Build, score and log the ensemble of `config.runs` or of the top `config.top_k` trials of `config.study`."""
    data = Path(data)
    info = read_info(data)
    tracking.connect()
    sources, described = study_members(config) if config.study else (list(config.runs or []), {})
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = [load_checkpoint(source, Path(scratch) / str(index)) for index, source in enumerate(sources)]
    ensemble = combine(checkpoints, sources, described)
    for source, checkpoint in zip(sources, checkpoints, strict=True):
        check_fits(checkpoint, source, data, info)
    device = resolve_device(config.device)
    arrays = read_split(data, config.split)
    labels, members = arrays.labels, member_probabilities(checkpoints, arrays, config.batch_size, device)
    probabilities = np.mean(members, axis=0)  # what the Ensemble network's softmax gives, without a second pass
    rule = ThresholdRule.parse(config.threshold_rule) if config.threshold_rule else shared_threshold_rule(checkpoints)
    positive = positive_index(info.classes, ensemble["positive_class"], info.task)
    ensemble["threshold"], ensemble["threshold_prevalence"] = validation_threshold(
        checkpoints, data, info, config.batch_size, device, rule, positive
    )
    ensemble["threshold_rule"] = str(rule)  # how the threshold was chosen, as a training run records it
    table = comparison(info, labels, probabilities, members, sources, checkpoints, ensemble["threshold"], positive)
    if "trials" in described:
        table.insert(2, "trial", ["", *map(str, described["trials"])])
    tags = {"classifier.command": "ensemble", "classifier.data": str(data.resolve())}
    run_name = f"ensemble-{config.study or len(sources)}"
    with tracking.start_run(config.experiment, run_name, tags), tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        params = {"ensemble_data": str(data), "ensemble_split": config.split, "ensemble_size": len(sources)}
        params.update({f"member{index}": source for index, source in enumerate(sources)})
        tracking.log_params({**params, **({"ensemble_study": config.study} if config.study else {})})
        tracking.log_metrics(table_metrics(table, ensemble["threshold"]))
        shows = f"{config.split} split, run {tracking.active_run_name()}"
        report = folder / "evaluation"
        write_report(report, labels, probabilities, info.classes, ensemble["threshold"], positive, shows)
        table.to_csv(folder / "evaluation" / COMPARISON_FILE, index=False)
        tracking.log_artifacts(folder)
        torch.save(ensemble, folder / "ensemble.pt")
        logged = log_classifier_model(
            folder / "ensemble.pt",
            name="model",
            registered_model_name=config.register_as,
            metadata={"members": sources},
        )
        run_id = tracking.active_run_id()
    version = str(logged.registered_model_version) if config.register_as else None
    return EnsembleResult(run_id, logged.model_uri, ensemble["threshold"], table, version)


def study_members(config: EnsembleConfig) -> tuple[list[str], dict[str, Any]]:
    """The training runs of the study's best `top_k` completed trials (best first), and what to store about them."""
    if config.storage is None or "://" not in config.storage:
        journal = Path(config.storage or default_storage())
        if not journal.is_file():
            raise UserError(f"--storage {journal}: no Optuna journal there; pass the --storage the search used")
    storage = open_storage(config.storage)
    try:
        study = optuna.load_study(study_name=config.study, storage=storage)
    except KeyError:
        known = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise UserError(f"--study {config.study}: no such study in that storage (studies: {known})") from None
    trials = [
        trial
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "mlflow_run_id" in trial.user_attrs
    ]
    trials.sort(key=lambda trial: trial.value, reverse=study.direction == StudyDirection.MAXIMIZE)
    chosen = trials[: config.top_k]
    if len(chosen) < 2:
        raise UserError(
            f"--study {config.study}: {len(chosen)} completed trial(s); an ensemble needs at least 2, run more trials"
        )
    if len(chosen) < config.top_k:
        print(
            f"ensemble: study {config.study} has {len(chosen)} completed trials, fewer than --top-k {config.top_k}; "
            "using them all",
            file=sys.stderr,
        )
    described = {"study": config.study, "trials": [trial.number for trial in chosen]}
    return [trial.user_attrs["mlflow_run_id"] for trial in chosen], described


def member_probabilities(
    checkpoints: list[dict[str, Any]], arrays: SplitArrays, batch_size: int, device: torch.device
) -> list[np.ndarray]:
    """Each member's probabilities (softmax, or sigmoid for multi-label members) for the images of a split."""
    return [predict_split(checkpoint, arrays, batch_size, device)[1] for checkpoint in checkpoints]


def shared_threshold_rule(checkpoints: list[dict[str, Any]]) -> ThresholdRule:
    """The threshold rule the members were tuned with when they all agree, else the default rule."""
    rules = {stored_threshold_rule(checkpoint) for checkpoint in checkpoints}
    return rules.pop() if len(rules) == 1 else ThresholdRule.parse(DEFAULT_THRESHOLD_RULE)


def validation_threshold(
    checkpoints: list[dict[str, Any]],
    data: Path,
    info: DatasetInfo,
    batch_size: int,
    device: torch.device,
    rule: ThresholdRule,
    positive: int | None = None,
) -> tuple[float | list[float] | None, float | list[float] | None]:
    """(threshold, validation prevalence) of binary tasks: the threshold of the `positive` class (the second by
    default) chosen by `rule` on the validation split from the averaged probabilities, as `fit` does;
    multi-label tasks: one per class; None (argmax) for more classes, or without both classes in validation (e.g.
    data prepared with --folds)."""
    multi_label = info.task == "multi_label"
    if not multi_label and len(info.classes) != 2:
        return None, None
    validation = load_split(data, "validation")
    if multi_label and len(validation.labels) == 0:
        print(f"ensemble: {data} has no validation images; thresholds stay at 0.5", file=sys.stderr)
        return None, None
    if not multi_label and np.unique(validation.labels).size != 2:
        print(f"ensemble: {data} has no validation images of both classes; no decision threshold", file=sys.stderr)
        return None, None
    probabilities = np.mean(member_probabilities(checkpoints, validation, batch_size, device), axis=0)
    if multi_label:
        threshold = choose_thresholds(validation.labels, probabilities, rule)
        truth = validation.labels
    else:
        positive = 1 if positive is None else positive
        truth = validation.labels == positive
        threshold = choose_threshold(truth, probabilities[:, positive], rule)
    warning = few_images_warning(validation.labels, info.classes, threshold)
    if warning:
        print(f"ensemble: {warning}", file=sys.stderr)
    return threshold, prevalence(truth)


def comparison(
    info: DatasetInfo,
    labels: np.ndarray,
    probabilities: np.ndarray,
    members: list[np.ndarray],
    sources: list[str],
    checkpoints: list[dict[str, Any]],
    threshold: float | list[float] | None = None,
    positive: int | None = None,
) -> pd.DataFrame:
    """One row per model (ensemble, member0, member1, ...) with its source, architecture and split metrics, each
    scored at its own decision threshold(s) on the shared `positive` class."""
    rows = [{"model": "ensemble", "source": f"mean of {len(members)}", "architecture": "ensemble"}]
    rows[0].update(classification_metrics(labels, probabilities, info.classes, threshold, positive))
    for index, (source, checkpoint, member) in enumerate(zip(sources, checkpoints, members, strict=True)):
        row = {"model": f"member{index}", "source": source, "architecture": checkpoint["architecture"]}
        scores = classification_metrics(labels, member, info.classes, checkpoint.get("threshold"), positive)
        rows.append({**row, **scores})
    return pd.DataFrame(rows)


def table_metrics(table: pd.DataFrame, threshold: float | list[float] | None) -> dict[str, float]:
    """`ensemble_<metric>` and `member<i>_<metric>` for every metric in the comparison table, and the ensemble's
    decision threshold (`decision_threshold_<i>` per class for multi-label models)."""
    names = list(table.select_dtypes("number").columns)
    logged = {
        metric_name(f"{row['model']}_{name}"): float(row[name]) for row in table.to_dict("records") for name in names
    }
    if isinstance(threshold, list):
        logged.update({f"decision_threshold_{index}": value for index, value in enumerate(threshold)})
    elif threshold is not None:
        logged["decision_threshold"] = threshold
    return logged
