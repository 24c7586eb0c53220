"""`classifier cv`: a parent run, a nested run per fold, mean/std on the parent, read back from a real server."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from prepared import prepared_dataset

from classifier.config import TrainConfig
from classifier.cv import cross_validate
from classifier.errors import UserError


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
        assert parent.data.metrics[f"{key}_mean"] == pytest.approx(per_fold.mean())
        assert parent.data.metrics[f"{key}_std"] == pytest.approx(per_fold.std(ddof=1))
    assert "oof_accuracy" in parent.data.metrics
    artifacts = {item.path for item in client.list_artifacts(result.run_id, "out_of_fold")}
    assert "out_of_fold/confusion_matrix.png" in artifacts


def test_cv_needs_a_dataset_prepared_with_folds(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 5, "malignant": 5})

    with pytest.raises(UserError, match="prepare it with `classifier prepare --folds K`"):
        cross_validate(TrainConfig(), data)
