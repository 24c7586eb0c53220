"""`classifier evaluate`: a checkpoint, a run id or a logged model scored on a split, with bootstrap CIs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import write_class_folders
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import EvaluateConfig, PrepareConfig, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.prepare import prepare
from classifier.data.transforms import Normalise
from classifier.errors import UserError
from classifier.evaluation.evaluate import evaluate
from classifier.learn.inference import predict_split
from classifier.learn.train import fit
from classifier.measure.metrics import bootstrap_intervals, classification_metrics
from classifier.nets.models import create_model, model_from_checkpoint


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, object]:
    data = prepared_dataset(tmp_path, {"benign": 15, "malignant": 15})
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out")
    return data, fit(config, data)


def test_evaluate_scores_the_test_split_like_sklearn_and_logs_it(trained: tuple[Path, object]) -> None:
    data, result = trained

    evaluation = evaluate(EvaluateConfig(bootstrap=200), str(result.checkpoint), data)

    checkpoint = torch.load(result.checkpoint, weights_only=True)
    test = load_split(data, "test")
    normalise = Normalise(checkpoint["preprocessing"]["mean"], checkpoint["preprocessing"]["std"])
    with torch.no_grad():
        logits = model_from_checkpoint(checkpoint)(normalise(torch.from_numpy(test.images)))
    # scored as the model decides: the positive class from the validation threshold stored with it
    assert checkpoint["threshold"] is not None
    probabilities = logits.softmax(1).numpy()
    expected = classification_metrics(test.labels, probabilities, ["benign", "malignant"], checkpoint["threshold"])
    assert evaluation.metrics == pytest.approx(expected, nan_ok=True)  # nan: a ratio without cases (PPV)
    decided = (probabilities[:, 1] >= checkpoint["threshold"]).astype(int)
    assert evaluation.metrics["accuracy"] == pytest.approx(np.mean(decided == test.labels))
    for name, (low, high) in evaluation.intervals.items():
        assert low <= evaluation.metrics[name] <= high
    run = mlflow.MlflowClient().get_run(evaluation.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(expected["accuracy"])
    assert {"test_accuracy_ci_low", "test_roc_auc_ci_high", "test_macro_f1_ci_low"} <= set(run.data.metrics)
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(evaluation.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/roc_curve.png"} <= artifacts

    printed = CliRunner().invoke(main, ["evaluate", str(result.checkpoint), str(data), "--bootstrap", "100"]).output
    interval = re.search(r"accuracy: ([\d.]+) \(95% CI ([\d.]+)-([\d.]+)\)", printed)
    assert interval is not None, printed
    assert float(interval[2]) <= float(interval[1]) == pytest.approx(expected["accuracy"], abs=1e-4)
    assert float(interval[1]) <= float(interval[3])


def test_evaluate_and_predict_decide_alike_on_every_test_image(trained: tuple[Path, object]) -> None:
    data, result = trained
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    test = load_split(data, "test")
    _, probabilities = predict_split(checkpoint, test, 4, torch.device("cpu"))  # what evaluate scores
    evaluation = evaluate(EvaluateConfig(bootstrap=0), str(result.checkpoint), data)

    files = [str(data / path) for path in test.paths]
    printed = CliRunner().invoke(main, ["predict", str(result.checkpoint), *files, "--output", "-"])
    assert printed.exit_code == 0, printed.output
    table = pd.read_csv(io.StringIO(printed.stdout)).set_index("path").loc[files]

    np.testing.assert_allclose(table[["prob_benign", "prob_malignant"]].to_numpy(), probabilities, atol=1e-6)
    decided = np.where(probabilities[:, 1] >= checkpoint["threshold"], "malignant", "benign")
    assert list(table["label"]) == list(decided)
    truth = np.array(["benign", "malignant"])[test.labels]
    assert evaluation.metrics["accuracy"] == pytest.approx(np.mean(table["label"].to_numpy() == truth))


def test_evaluate_accepts_a_run_id_or_a_logged_model_with_tta(trained: tuple[Path, object]) -> None:
    data, result = trained
    config = EvaluateConfig(bootstrap=0, tta=True, split="validation")

    by_file = evaluate(config, str(result.checkpoint), data)
    by_run = evaluate(config, result.run_id, data)
    by_model = evaluate(config, result.model_uri, data)

    assert by_run.metrics == pytest.approx(by_file.metrics, rel=0, abs=0, nan_ok=True)
    assert by_model.metrics == pytest.approx(by_file.metrics, rel=0, abs=0, nan_ok=True)
    assert by_file.intervals == {}


def test_evaluate_rejects_a_model_trained_on_other_classes(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"cat": 5, "dog": 5, "eel": 5})
    checkpoint = tmp_path / "two-classes.pt"
    model = create_model("simple_cnn", 2, 3)
    described = {"architecture": "simple_cnn", "num_classes": 2, "in_chans": 3, "state_dict": model.state_dict()}
    described.update(classes=["benign", "malignant"], preprocessing={"size": 16, "channels": 3})
    torch.save(described, checkpoint)

    with pytest.raises(UserError, match=r"trained on classes \['benign', 'malignant'\]"):
        evaluate(EvaluateConfig(), str(checkpoint), data)


def test_evaluate_resamples_the_manifests_groups_when_it_has_them(tmp_path: Path) -> None:
    images = write_class_folders(tmp_path / "images", {"cancer": 24, "normal": 24}, size=(16, 16))
    rows = [
        {"path": str(path), "label": path.parent.name, "lesion": f"{path.parent.name}-{int(path.stem[-3:]) // 4}"}
        for path in sorted(images.rglob("*.png"))
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "lesions.csv", index=False)
    data = tmp_path / "prepared"
    prepare(tmp_path / "lesions.csv", data, PrepareConfig(size=16, group_column="lesion", fractions=[0.5, 0.2, 0.3]))
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out")
    checkpoint = fit(config, data, log_model=False).checkpoint

    evaluation = evaluate(EvaluateConfig(bootstrap=200, seed=3), str(checkpoint), data)

    test = load_split(data, "test")
    assert test.rows["group"].nunique() < len(test.rows)  # four images per lesion
    state = torch.load(checkpoint, weights_only=True)
    labels, probabilities = predict_split(state, test, 256, torch.device("cpu"))
    grouped = bootstrap_intervals(
        labels, probabilities, ["cancer", "normal"], 200, 3, state["threshold"], 0, test.rows["group"].tolist()
    )
    for key, interval in evaluation.intervals.items():
        np.testing.assert_allclose(interval, grouped[key], atol=1e-6, err_msg=key)
    assert {"sensitivity", "specificity", "npv", "balanced_accuracy"} <= set(evaluation.intervals)
    run = mlflow.MlflowClient().get_run(evaluation.run_id)
    assert run.data.params["bootstrap_resamples"] == "groups"
    assert run.data.tags["classifier.positive_class"] == "cancer"
    assert "test_sensitivity_ci_low" in run.data.metrics
