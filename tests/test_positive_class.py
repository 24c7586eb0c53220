"""The positive class: chosen at prepare (named, or the class not named like a negative one), carried by the model,
and the class that thresholds, sensitivity, AUC, curves and the served label are about."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint, write_class_folders
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import PrepareConfig, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.layout import choose_positive_class, read_info
from classifier.data.prepare import prepare
from classifier.errors import UserError
from classifier.learn.inference import predict_split
from classifier.learn.train import fit
from classifier.measure.metrics import classification_metrics
from classifier.measure.threshold import choose_threshold
from classifier.model.pyfunc import ImageClassifier, load_classifier, read_checkpoint
from classifier.nets.ensemble import combine


@pytest.mark.parametrize(
    ("classes", "positive"),
    [
        (["cancer", "normal"], "cancer"),
        (["abnormal", "normal"], "abnormal"),
        (["COVID", "Normal"], "COVID"),
        (["disease", "healthy"], "disease"),
        (["benign", "malignant"], "malignant"),
        (["Negative", "Positive"], "Positive"),
        (["No Finding", "effusion"], "effusion"),
        (["NORMAL", "PNEUMONIA"], "PNEUMONIA"),
    ],
)
def test_the_class_not_named_like_a_negative_one_is_positive(classes: list[str], positive: str) -> None:
    chosen, reason = choose_positive_class(classes, None)

    assert chosen == positive
    assert not reason.startswith("chose")  # no guess to report


def test_without_a_negative_name_the_second_class_is_positive_and_prepare_says_how_to_change_it() -> None:
    assert choose_positive_class(["cat", "dog"], None)[0] == "dog"
    assert "--positive-class cat" in choose_positive_class(["cat", "dog"], None)[1]
    assert choose_positive_class(["benign", "normal"], None)[0] == "normal"  # both negative-named: a guess too
    assert choose_positive_class(["cancer", "normal"], "normal") == ("normal", "given")
    assert choose_positive_class(["a", "b", "c"], None) == (None, "")
    with pytest.raises(UserError, match="not a class of this dataset; use one of cancer, normal"):
        choose_positive_class(["cancer", "normal"], "tumour")
    with pytest.raises(UserError, match="only two-class single-label data"):
        choose_positive_class(["a", "b", "c"], "a")
    with pytest.raises(UserError, match="multi-label"):
        choose_positive_class(["a", "b"], "a", "multi_label")


def test_prepare_records_the_positive_class_and_an_option_changes_it_in_place(tmp_path: Path) -> None:
    images = write_class_folders(tmp_path / "images", {"cat": 10, "dog": 10}, size=(8, 8))
    output = tmp_path / "pets"

    prepared = CliRunner().invoke(main, ["prepare", str(images), str(output), "--size", "8"])

    assert prepared.exit_code == 0, prepared.output
    assert "positive class chose 'dog'" in prepared.stderr and "--positive-class cat" in prepared.stderr
    info = read_info(output)
    assert info.positive_class == "dog" and info.positive_index == 1
    manifest_time = (output / "manifest.csv").stat().st_mtime_ns

    again = CliRunner().invoke(main, ["prepare", str(images), str(output), "--size", "8", "--positive-class", "cat"])

    assert again.exit_code == 0, again.output
    changed = read_info(output)
    assert changed.positive_class == "cat" and changed.positive_index == 0
    assert changed.fingerprint == info.fingerprint  # same images, same splits: nothing rewritten
    assert (output / "manifest.csv").stat().st_mtime_ns == manifest_time
    refused = CliRunner().invoke(main, ["prepare", str(images), str(output), "--size", "8", "--positive-class", "eel"])
    assert refused.exit_code != 0 and "use one of cat, dog" in refused.output


def test_a_dataset_json_written_before_the_positive_class_reads_as_the_second_class(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"cancer": 5, "normal": 5})
    values = json.loads((data / "dataset.json").read_text())
    assert values["positive_class"] == "cancer"
    del values["positive_class"]
    (data / "dataset.json").write_text(json.dumps(values))

    info = read_info(data)

    assert info.positive_class is None and info.positive_index == 1  # today's behaviour: `normal`


def test_a_cancer_normal_dataset_is_about_cancer_from_prepare_to_the_served_label(tmp_path: Path) -> None:
    images = write_class_folders(tmp_path / "images", {"cancer": 20, "normal": 20}, size=(16, 16))
    data = tmp_path / "prepared"
    prepare(images, data, PrepareConfig(size=16, fractions=[0.6, 0.2, 0.2]))
    assert read_info(data).positive_class == "cancer"  # although it sorts first
    config = TrainConfig(
        epochs=2, batch_size=8, lr=3e-3, augment="none", system_metrics=False, num_workers=0, output_dir=tmp_path / "o"
    )

    result = fit(config, data)

    checkpoint = read_checkpoint(result.checkpoint)
    assert checkpoint["classes"] == ["cancer", "normal"] and checkpoint["positive_class"] == "cancer"
    validation = load_split(data, "validation")
    labels, probabilities = predict_split(checkpoint, validation, 64, torch.device("cpu"))
    assert checkpoint["threshold"] == pytest.approx(choose_threshold(labels == 0, probabilities[:, 0]))
    metrics = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    tuned = classification_metrics(labels, probabilities, ["cancer", "normal"], checkpoint["threshold"], positive=0)
    assert metrics["tuned_val_sensitivity"] == pytest.approx(tuned["recall_cancer"])
    assert metrics["tuned_val_specificity"] == pytest.approx(tuned["recall_normal"])
    assert metrics["tuned_val_pr_auc"] == pytest.approx(tuned["pr_auc"])
    assert {"tuned_val_sensitivity_at_specificity_0.90", "tuned_val_ppv", "tuned_val_npv"} <= set(metrics)

    test = load_split(data, "test")
    served = load_classifier(result.model_uri).predict(pd.Series([str(data / path) for path in test.paths]))
    # the label is `cancer` exactly where P(cancer) reaches the threshold; the cancer images have the higher P(cancer)
    assert list(served["label"] == "cancer") == list(served["prob_cancer"] >= checkpoint["threshold"])
    assert served["label"].nunique() == 2
    assert served["prob_cancer"][test.labels == 0].min() > served["prob_cancer"][test.labels == 1].max()
    model = mlflow.models.get_model_info(result.model_uri)
    assert model.metadata["positive_class"] == "cancer"


def test_train_can_choose_another_positive_class_for_a_prepared_dataset(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"cancer": 10, "normal": 10})
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out")

    result = fit(TrainConfig(**{**config.__dict__, "positive_class": "normal"}), data, log_model=False)

    assert torch.load(result.checkpoint, weights_only=True)["positive_class"] == "normal"
    with pytest.raises(UserError, match="--positive-class tumour: not a class"):
        fit(TrainConfig(**{**config.__dict__, "positive_class": "tumour"}), data, log_model=False)


def test_the_served_decision_thresholds_the_positive_class(tmp_path: Path) -> None:
    checkpoint = read_checkpoint(write_checkpoint(tmp_path / "m.pt", classes=("cancer", "normal"), threshold=0.9))
    probabilities = np.array([[0.95, 0.05], [0.8, 0.2], [0.1, 0.9]])

    old = ImageClassifier(checkpoint)  # a model from before the positive class: the second class is thresholded
    assert old.labels(probabilities) == ["cancer", "cancer", "normal"]
    new = ImageClassifier({**checkpoint, "positive_class": "cancer"})
    assert new.labels(probabilities) == ["cancer", "normal", "normal"]  # P(cancer) 0.8 < 0.9: normal
    np.testing.assert_allclose(new.confidences(probabilities), [0.95, 0.2, 0.9])


def test_ensemble_members_must_share_the_positive_class(tmp_path: Path) -> None:
    members = [read_checkpoint(write_checkpoint(tmp_path / f"{index}.pt")) for index in range(2)]
    members[0]["positive_class"] = "benign"

    with pytest.raises(UserError, match="differ in positive_class"):
        combine(members, ["a", "b"], {})
    members[1]["positive_class"] = "benign"
    assert combine(members, ["a", "b"], {})["positive_class"] == "benign"
