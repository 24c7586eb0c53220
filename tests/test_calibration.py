"""Temperature scaling: fitted on validation logits, stored in the model, served by every consumer; ECE, Brier and
the reliability diagram in every evaluation."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_checkpoint
from prepared import prepared_dataset
from scipy.special import expit, softmax

from classifier.config import EvaluateConfig, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.transforms import Normalise
from classifier.evaluation.evaluate import evaluate
from classifier.learn.train import fit
from classifier.measure.calibration import calibration_metrics, expected_calibration_error, fit_temperature
from classifier.model.pyfunc import load_classifier
from classifier.nets.ensemble import combine, ensemble_from_checkpoint
from classifier.nets.models import model_from_checkpoint


def over_confident(n: int, classes: int, seed: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true logits) and a model's logits `scale` times too large (over-confident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (n, classes))
    labels = np.array([rng.choice(classes, p=row) for row in softmax(true_logits, axis=1)])
    return true_logits * scale, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_temperature_scaling_fitted_on_validation_lowers_the_held_out_ece(classes: int) -> None:
    validation_logits, validation_labels = over_confident(2000, classes, seed=0)
    test_logits, test_labels = over_confident(2000, classes, seed=1)

    temperature = fit_temperature(validation_logits, validation_labels)

    assert temperature == pytest.approx(3.0, rel=0.15)  # the over-confidence put in
    before = calibration_metrics(test_labels, softmax(test_logits, axis=1))
    after = calibration_metrics(test_labels, softmax(test_logits / temperature, axis=1))
    assert after["ece"] < before["ece"] / 2
    assert after["brier"] < before["brier"]


def test_temperature_minimises_the_validation_log_likelihood() -> None:
    logits, labels = over_confident(500, 3, seed=2, scale=0.5)  # under-confident: T below 1

    temperature = fit_temperature(logits, labels)

    def nll(value: float) -> float:
        return -np.mean(np.log(softmax(logits / value, axis=1)[np.arange(len(labels)), labels]))

    assert temperature < 1
    assert nll(temperature) <= min(nll(temperature * 0.97), nll(temperature * 1.03))


def test_multi_label_temperature_is_one_scalar_over_sigmoids() -> None:
    rng = np.random.default_rng(3)
    true_logits = rng.normal(0, 2, (3000, 5))
    labels = (rng.random((3000, 5)) < expit(true_logits)).astype(np.float32)

    temperature = fit_temperature(true_logits * 4, labels, multi_label=True)

    assert temperature == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(labels.ravel(), expit(true_logits * 4).ravel())
    assert expected_calibration_error(labels.ravel(), expit(true_logits * 4 / temperature).ravel()) < before / 2


def test_ensemble_members_serve_their_own_calibrated_probabilities(tmp_path: Path) -> None:
    checkpoints = [torch.load(write_checkpoint(tmp_path / f"{index}.pt"), weights_only=True) for index in range(2)]
    torch.manual_seed(1)
    checkpoints[1]["state_dict"] = {
        key: value + 0.05 * torch.randn_like(value.float()).to(value.dtype)
        for key, value in checkpoints[1]["state_dict"].items()
    }
    checkpoints[0]["temperature"] = 2.5
    ensemble = ensemble_from_checkpoint(combine(checkpoints, ["a", "b"], {}))
    batch = torch.randn(4, 3, 32, 32)

    with torch.no_grad():
        plain = [model_from_checkpoint({**checkpoint, "temperature": None})(batch) for checkpoint in checkpoints]
        expected = (torch.softmax(plain[0] / 2.5, 1) + torch.softmax(plain[1], 1)) / 2
        np.testing.assert_allclose(ensemble(batch).softmax(1).numpy(), expected.numpy(), atol=1e-6)
        # the member network keeps its type and features: only its logits are scaled
        calibrated = model_from_checkpoint(checkpoints[0])
        assert type(calibrated).__name__ == "SimpleCNN"
        torch.testing.assert_close(calibrated(batch), plain[0] / 2.5)


def test_train_calibrate_temperature_is_stored_and_served_by_every_consumer(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 20, "malignant": 20})
    config = TrainConfig(
        epochs=3,
        batch_size=8,
        lr=1e-2,
        augment="none",
        system_metrics=False,
        num_workers=0,
        output_dir=tmp_path / "out",
        calibrate="temperature",
    )

    result = fit(config, data)

    checkpoint = torch.load(result.checkpoint, weights_only=True)
    temperature = checkpoint["temperature"]
    assert temperature is not None and temperature > 0
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["calibration_temperature"] == pytest.approx(temperature)
    assert {"uncalibrated_val_ece", "tuned_val_ece", "tuned_val_brier", "val_ece"} <= set(run.data.metrics)
    # the network's raw logits divided by T, as the logged model, evaluate and the threshold all see them
    test = load_split(data, "test")
    normalise = Normalise(checkpoint["preprocessing"]["mean"], checkpoint["preprocessing"]["std"])
    raw = model_from_checkpoint({**checkpoint, "temperature": None})
    with torch.no_grad():
        expected = (raw(normalise(torch.from_numpy(test.images))) / temperature).softmax(1).numpy()
    served = load_classifier(result.model_uri).predict(pd.Series([str(data / path) for path in test.paths]))
    np.testing.assert_allclose(served[["prob_benign", "prob_malignant"]].to_numpy(), expected, atol=1e-5)
    evaluation = evaluate(EvaluateConfig(bootstrap=0), result.model_uri, data)
    assert evaluation.metrics["ece"] == pytest.approx(calibration_metrics(test.labels, expected)["ece"], abs=1e-5)
    assert evaluation.metrics["brier"] == pytest.approx(calibration_metrics(test.labels, expected)["brier"], abs=1e-5)
    evaluated = mlflow.MlflowClient().get_run(evaluation.run_id)
    assert {"test_ece", "test_brier"} <= set(evaluated.data.metrics)
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(evaluation.run_id, "evaluation")}
    assert "evaluation/reliability_diagram.png" in artifacts
    trained = {item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/reliability_diagram.png" in trained
