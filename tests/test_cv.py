"""`classifier cv`: a parent run, a nested run per fold, mean/std on the parent, read back from a real server."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from prepared import prepared_dataset

from classifier.config import TrainConfig
from classifier.data.dataset import load_split
from classifier.data.layout import read_info
from classifier.errors import UserError
from classifier.learn.cv import cross_validate
from classifier.learn.inference import predict_split
from classifier.measure.metrics import classification_metrics


@pytest.mark.slow
def test_cv_logs_nested_fold_runs_and_their_mean_and_std(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepared_dataset(tmp_path, {"benign": 15, "malignant": 15}, folds=3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    quick = {"epochs": 1, "batch_size": 8, "augment": "none", "system_metrics": False, "num_workers": 0}
    config = TrainConfig(experiment="cv-test", output_dir=tmp_path / "outputs", **quick)

    result = cross_validate(config, data)

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.run_id}'",
        order_by=["attributes.start_time"],
    )
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(child.data.tags["classifier.fold"] for child in children) == ["0", "1", "2"]
    for key in ("val_accuracy", "val_roc_auc", "val_macro_f1", "val_loss"):
        per_fold = np.array([child.data.metrics[f"best_{key}"] for child in children])
        assert parent.data.metrics[f"best_{key}_mean"] == pytest.approx(per_fold.mean())  # of each fold's best
        assert parent.data.metrics[f"best_{key}_std"] == pytest.approx(per_fold.std(ddof=1))
        assert f"{key}_mean" not in parent.data.metrics
    assert "oof_accuracy" in parent.data.metrics
    artifacts = {item.path for item in client.list_artifacts(result.run_id, "out_of_fold")}
    assert "out_of_fold/confusion_matrix.png" in artifacts


def test_cv_needs_a_dataset_prepared_with_folds(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 5, "malignant": 5})

    with pytest.raises(UserError, match="prepare it with `classifier prepare --folds K`"):
        cross_validate(TrainConfig(), data)


def test_out_of_fold_metrics_decide_each_image_at_its_own_fold_models_threshold(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"cancer": 12, "normal": 12}, folds=2)
    config = TrainConfig(
        epochs=1, batch_size=8, augment="none", system_metrics=False, num_workers=0, output_dir=tmp_path / "out"
    )

    result = cross_validate(config, data)

    training = load_split(data, "training")
    info = read_info(data)
    labels = np.empty_like(training.labels)
    probabilities = np.empty((len(labels), 2), dtype=np.float32)
    thresholds = np.empty(len(labels))
    for fold, run_id in enumerate(result.fold_run_ids):
        checkpoint = torch.load(tmp_path / "out" / run_id / "best.pt", weights_only=True)
        assert checkpoint["positive_class"] == "cancer" and checkpoint["threshold"] is not None
        rows = np.flatnonzero(training.folds == fold)
        labels[rows], probabilities[rows] = predict_split(checkpoint, training, 16, torch.device("cpu"), rows=rows)
        thresholds[rows] = checkpoint["threshold"]
    decided = np.where(probabilities[:, 0] >= thresholds, 0, 1)  # cancer (index 0) where P(cancer) reaches it
    assert result.out_of_fold["accuracy"] == pytest.approx(np.mean(decided == labels))
    expected = classification_metrics(labels, probabilities, info.classes, thresholds, positive=0)
    assert result.out_of_fold == pytest.approx(expected, nan_ok=True)
    assert result.out_of_fold["sensitivity"] == pytest.approx(np.mean(decided[labels == 0] == 0))
