"""Numbers that mean what they say, on the small imbalanced splits where they went wrong: classes absent from a split
or a resample, ties for the best epoch, multi-label confidence, the given class order, multi-label counts, visible
decision thresholds, cross-validation names, plot titles and console noise. Metrics are checked against sklearn."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import class_image, write_checkpoint
from fastapi.testclient import TestClient
from prepared import prepared_dataset
from sklearn import metrics

from classifier import console, tracking
from classifier.cli import main
from classifier.config import EvaluateConfig, PrepareConfig, TrainConfig, build_config
from classifier.data.dataset import load_split
from classifier.data.layout import read_info, read_manifest
from classifier.data.prepare import _progress, prepare
from classifier.errors import UserError
from classifier.evaluation import evaluate as evaluate_module
from classifier.evaluation.evaluate import evaluate
from classifier.learn import train as train_module
from classifier.learn.cv import cross_validate
from classifier.learn.train import compare_epochs, fit
from classifier.measure import plots
from classifier.measure.metrics import absent_classes, bootstrap_intervals, classification_metrics
from classifier.measure.threshold import few_images_warning
from classifier.model.pyfunc import ImageClassifier, load_classifier
from classifier.nets.models import create_model
from classifier.serving.http import create_app

LESIONS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # HAM10000's seven, vasc the rare one


def one_hot_probabilities(predictions: np.ndarray, classes: int, sure: float = 0.9) -> np.ndarray:
    """Probabilities whose argmax is `predictions`."""
    probabilities = np.full((len(predictions), classes), (1 - sure) / (classes - 1))
    probabilities[np.arange(len(predictions)), predictions] = sure
    return probabilities


# 1. A class absent from a split (or from a bootstrap resample) is left out, not scored 0.


def test_a_class_absent_from_the_split_is_left_out_of_every_average_not_scored_zero() -> None:
    labels = np.repeat(np.arange(6), [3, 4, 5, 2, 6, 20])  # a test split with no vasc (class 6)
    perfect = classification_metrics(labels, one_hot_probabilities(labels, 7), LESIONS)

    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["macro_f1"] == 1.0  # was 0.8571 (6/7)
    assert np.isnan(perfect["recall_vasc"])  # was 0.0000
    assert absent_classes(labels, LESIONS) == ["vasc"]

    # Imperfect, with predictions of the absent class: as sklearn scores the classes present (labels=).
    predictions = labels.copy()
    predictions[[0, 7, 12, 30]] = [6, 6, 1, 0]
    scores = classification_metrics(labels, one_hot_probabilities(predictions, 7), LESIONS)
    present = list(range(6))
    assert scores["macro_f1"] == pytest.approx(metrics.f1_score(labels, predictions, labels=present, average="macro"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": sklearn leaves them out too
        assert scores["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(labels, predictions))
    recalls = metrics.recall_score(labels, predictions, labels=present, average=None)
    assert [scores[f"recall_{name}"] for name in LESIONS[:6]] == pytest.approx(list(recalls))
    assert np.isnan(scores["recall_vasc"])


def test_bootstrap_resamples_leave_out_the_classes_they_miss() -> None:
    labels = np.repeat([0, 1, 2], [30, 25, 2])  # two images of the rare class: many resamples miss it
    perfect = bootstrap_intervals(labels, one_hot_probabilities(labels, 3), ["a", "b", "rare"], resamples=200)
    assert perfect["accuracy"] == (1.0, 1.0)
    assert perfect["macro_f1"] == (1.0, 1.0)  # was 0.75-1.00: the resamples without `rare` scored its F1 as 0

    predictions = labels.copy()
    predictions[[0, 31, 56]] = [1, 0, 0]
    probabilities = one_hot_probabilities(predictions, 3)
    intervals = bootstrap_intervals(labels, probabilities, ["a", "b", "rare"], resamples=200, seed=5)
    rng, expected = np.random.default_rng(5), []  # the same resamples, scored by sklearn over the classes each holds
    for _ in range(200):
        sample = rng.integers(0, len(labels), len(labels))
        held = np.unique(labels[sample])
        expected.append(metrics.f1_score(labels[sample], predictions[sample], labels=held, average="macro"))
    assert intervals["macro_f1"] == pytest.approx((np.percentile(expected, 2.5), np.percentile(expected, 97.5)))
    point = classification_metrics(labels, probabilities, ["a", "b", "rare"])["macro_f1"]
    assert intervals["macro_f1"][0] <= point <= intervals["macro_f1"][1]


def test_multilabel_classes_without_positives_are_left_out_of_macro_f1() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.uniform(size=(40, 4)) < 0.4).astype(int)
    labels[:, 3] = 0  # golgi: no cell in this split has it
    labels[labels.sum(axis=1) == 0, 0] = 1  # every cell holds some class, as prepare requires
    probabilities = np.clip(labels * 0.6 + rng.uniform(0, 0.5, labels.shape), 0, 1)
    probabilities[:3, 3] = 0.9  # and the model claims golgi for three cells
    classes = ["nucleoplasm", "mitochondria", "cytosol", "golgi"]

    scores = classification_metrics(labels, probabilities, classes)

    predictions = (probabilities >= 0.5).astype(int)
    expected = metrics.f1_score(labels[:, :3], predictions[:, :3], average="macro")
    assert scores["macro_f1"] == pytest.approx(expected)
    assert np.isnan(scores["f1_golgi"])
    assert scores["micro_f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="micro"))  # FPs count
    assert absent_classes(labels, classes) == ["golgi"]


def write_split_folders(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """A source already split: `counts[split][class]` generated images in `root/<split>/<class>/`."""
    for split, per_class in counts.items():
        for label, (name, count) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                class_image(LESIONS.index(name), 100 * label + index, (16, 16)).save(
                    root / split / name / f"{split}_{name}_{index}.png"
                )
    return root


def test_prepare_warns_of_the_split_without_a_class_and_evaluate_says_it_left_it_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {
        "training": {"mel": 6, "nv": 8, "vasc": 3},
        "validation": {"mel": 2, "nv": 2, "vasc": 1},
        "test": {"mel": 3, "nv": 4},
    }
    source = write_split_folders(tmp_path / "ham", counts)
    data = tmp_path / "prepared"

    prepare(source, data, PrepareConfig(size=16, workers=1))

    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: the test split has no images of class vasc; metrics there leave it out"]

    shows = []
    real_report = evaluate_module.write_report
    monkeypatch.setattr(evaluate_module, "write_report", lambda *a: shows.append(a[-1]) or real_report(*a))
    model = write_checkpoint(tmp_path / "model.pt", classes=("mel", "nv", "vasc"), size=16)
    result = CliRunner().invoke(main, ["evaluate", str(model), str(data), "--bootstrap", "50", "--device", "cpu"])

    assert result.exit_code == 0, result.output
    assert re.search(r"^recall_vasc: nan$", result.output, re.MULTILINE)
    assert "no test images of vasc: left out of the averages (not scored 0)" in result.output
    assert shows == [f"test split, model {model}"]  # item 8: the plots name the split and the model


def test_the_classification_report_lists_the_classes_present_and_names_the_absent(tmp_path: Path) -> None:
    labels = np.repeat([0, 1], [5, 4])  # no vasc
    predictions = np.array([0, 0, 0, 0, 2, 1, 1, 1, 0])
    plots.write_report(tmp_path, labels, one_hot_probabilities(predictions, 3), ["mel", "nv", "vasc"])

    report = json.loads((tmp_path / "classification_report.json").read_text())
    expected = metrics.f1_score(labels, predictions, labels=[0, 1], average="macro")
    assert report["macro avg"]["f1-score"] == pytest.approx(expected)  # as macro_f1 scores it, vasc not a 0
    assert "vasc" not in report and report["left_out"] == ["vasc"]
    assert "left out (no images of them here): vasc" in (tmp_path / "classification_report.txt").read_text()


def test_prepare_warns_of_each_fold_without_a_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "lesions"
    folder.mkdir()
    rows = []
    for name, count in (("mel", 12), ("nv", 12), ("vasc", 3)):
        for index in range(count):
            class_image(LESIONS.index(name), index, (16, 16)).save(folder / f"{name}{index}.png")
            group = "one-vasc-lesion" if name == "vasc" else f"{name}-{index}"  # all three vasc images: one lesion
            rows.append({"path": f"lesions/{name}{index}.png", "label": name, "lesion_id": group})
    pd.DataFrame(rows).to_csv(tmp_path / "images.csv", index=False)
    config = PrepareConfig(size=16, folds=3, group_column="lesion_id", fractions=[0.9, 0.1, 0.0], workers=1)

    prepare(tmp_path / "images.csv", tmp_path / "out", config)

    manifest = read_manifest(tmp_path / "out")
    (vasc_fold,) = set(manifest.loc[manifest["label"] == "vasc", "fold"])
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == [
        f"warning: fold {fold} has no images of class vasc; metrics there leave it out"
        for fold in range(3)
        if fold != vasc_fold
    ]
    # item 7: in folds mode there is no validation split, and dataset.json says so
    assert read_info(tmp_path / "out").fractions == {"training": 1.0, "validation": 0.0, "test": 0.0}


# 2. Ties for the best epoch.


def test_a_tie_on_the_monitored_metric_keeps_the_epoch_with_the_lower_validation_loss() -> None:
    epochs = [{"val_macro_f1": 1.0, "val_loss": loss} for loss in (1.168, 1.02, 0.898)]  # the run

    assert compare_epochs(epochs[2], epochs[0], "val_macro_f1", True) == (True, False)  # kept, but no gain
    assert compare_epochs(epochs[0], epochs[2], "val_macro_f1", True) == (False, False)
    same = {"val_loss": 0.5, "val_loss_again": 0}
    assert compare_epochs(same, dict(same), "val_loss", False) == (True, False)  # a full tie: the later epoch
    better = {"val_macro_f1": 0.9, "val_loss": 2.0}
    worse = {"val_macro_f1": 0.8, "val_loss": 0.1}
    assert compare_epochs(better, worse, "val_macro_f1", True) == (True, True)  # the monitor decides first


def test_fit_keeps_the_tied_epoch_of_lowest_validation_loss_and_counts_it_from_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepared_dataset(tmp_path, {"benign": 12, "malignant": 12}, mode="L")
    real = train_module.classification_metrics

    def perfect_every_epoch(*arguments, **options):
        return {**real(*arguments, **options), "macro_f1": 1.0}

    monkeypatch.setattr(train_module, "classification_metrics", perfect_every_epoch)
    quick = {"batch_size": 8, "lr": 3e-3, "augment": "none", "system_metrics": False, "num_workers": 0}
    config = TrainConfig(epochs=3, monitor="macro_f1", output_dir=tmp_path / "outputs", **quick)

    result = fit(config, data, log_model=False)

    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")
    losses = [metric.value for metric in sorted(history, key=lambda metric: metric.step)]
    lowest = max(index for index, loss in enumerate(losses) if loss == min(losses))
    assert result.best_epoch == lowest + 1  # counted from 1, as the progress bar shows "3/3"
    assert result.best_metrics["val_loss"] == min(losses)
    assert mlflow.get_run(result.run_id).data.metrics["best_epoch"] == result.best_epoch


# 3. Multi-label confidence is that of the predicted classes.


def multilabel_classifier(tmp_path: Path, thresholds: list[float] | None) -> ImageClassifier:
    classes = ("nucleoplasm", "cytosol", "golgi")
    checkpoint = torch.load(write_checkpoint(tmp_path / "cells.pt", classes, size=16), weights_only=True)
    checkpoint.update(task="multi_label", threshold=thresholds, config={"model": "simple_cnn", "target_recall": None})
    return ImageClassifier(checkpoint, inference_device="cpu", decode_workers=1)


def test_multilabel_confidence_is_the_weakest_predicted_class(tmp_path: Path) -> None:
    classifier = multilabel_classifier(tmp_path, [0.5, 0.3, 0.5])
    probabilities = np.array(
        [
            [0.4534, 0.347, 0.1],  # the row: cytosol predicted at its threshold, nucleoplasm not
            [0.9, 0.6, 0.7],  # three classes: the weakest of them
            [0.2, 0.1, 0.3],  # none predicted: how sure it is that even the likeliest is absent
        ]
    )

    table = classifier.table(probabilities, [None] * 3)

    assert list(table["label"]) == ["cytosol", "nucleoplasm cytosol golgi", ""]
    assert table["confidence"].tolist() == pytest.approx([0.347, 0.6, 0.7])
    for row in table.itertuples():  # every predicted class has at least the confidence
        predicted = [getattr(row, f"prob_{name}") for name in row.label.split()]
        assert all(value >= row.confidence for value in predicted)


# 4. The given class order is the index meaning, everywhere.


def test_class_names_keep_their_order_as_the_index_meaning(tmp_path: Path) -> None:
    names = ["nucleoplasm", "cytosol", "actin", "golgi"]  # HPA-style, not alphabetical
    folder = tmp_path / "cells"
    folder.mkdir()
    rows = []
    for index in range(24):
        first, second = index % 4, (index + 1) % 4
        class_image(first, index, (16, 16)).save(folder / f"cell{index}.png")
        rows.append({"path": f"cells/cell{index}.png", "label": f"{second} {first}"})  # indices, unordered
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    config = PrepareConfig(size=16, multi_label=True, class_names=names, fractions=[0.5, 0.25, 0.25], workers=1)

    prepare(tmp_path / "cells.csv", tmp_path / "out", config)

    data = tmp_path / "out"
    assert read_info(data).classes == names
    manifest = read_manifest(data)
    for label in manifest["label"]:  # each cell lists its classes in the given order
        assert label.split() == sorted(label.split(), key=names.index)
    training = load_split(data, "training")
    with_nucleoplasm = manifest[manifest["split"] == "training"]["label"].str.split().map(lambda row: names[0] in row)
    np.testing.assert_array_equal(training.labels[:, 0], with_nucleoplasm.to_numpy().astype(np.float32))

    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "o")
    result = fit(config, data, log_model=False)
    classifier = load_classifier(str(result.checkpoint))
    assert classifier.classes == names and classifier.probability_columns == [f"prob_{name}" for name in names]
    assert [key for key in result.best_metrics if key.startswith("val_f1_")] == [f"val_f1_{name}" for name in names]


def test_class_names_given_twice_are_refused() -> None:
    with pytest.raises(UserError, match="option 'class_names' names cytosol more than once"):
        build_config(PrepareConfig, {"class_names": "nucleoplasm,cytosol,cytosol"}, origin="prepare")


def test_npz_labels_keep_their_numeric_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 4)
    images = rng.integers(0, 255, (len(labels), 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "digits.npz", train_images=images, train_labels=labels)

    prepare(tmp_path / "digits.npz", tmp_path / "out", PrepareConfig(size=8, fractions=[1.0, 0.0, 0.0], workers=1))

    assert read_info(tmp_path / "out").classes == [str(label) for label in range(12)]  # not 0, 1, 10, 11, 2, ...


# 5. Multi-label prepare counts images, not labels.


def test_multilabel_prepare_summary_and_logged_counts_are_images(tmp_path: Path, isolated_tracking: str) -> None:
    folder = tmp_path / "cells"
    folder.mkdir()
    rows = []
    for index in range(40):
        class_image(index % 3, index, (16, 16)).save(folder / f"cell{index}.png")
        rows.append({"path": f"cells/cell{index}.png", "label": ["a b", "b c", "a b c", "c"][index % 4]})
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    output = tmp_path / "out"

    result = CliRunner().invoke(
        main, ["prepare", str(tmp_path / "cells.csv"), str(output), "--multi-label", "--size", "16", "--workers", "1"]
    )

    assert result.exit_code == 0, result.output
    sizes = read_manifest(output)["split"].value_counts()
    assert sum(sizes) == 40
    expected = f"training {sizes['training']}, validation {sizes['validation']}, test {sizes['test']}"
    assert f"{output}: 3 classes, {expected}, 0 skipped" in result.output
    (run,) = mlflow.search_runs(experiment_names=["classifier"], output_format="list")
    assert {split: run.data.metrics[f"images_{split}"] for split in sizes.index} == sizes.to_dict()


# 6. The decision threshold shows where decisions are read.


def binary_model(tmp_path: Path, threshold: float) -> Path:
    model = write_checkpoint(tmp_path / "xray.pt", ("NORMAL", "PNEUMONIA"), size=16, threshold=threshold)
    checkpoint = torch.load(model, weights_only=True)
    checkpoint["config"] = {"model": "simple_cnn", "target_recall": 0.95}
    torch.save(checkpoint, model)
    return model


def test_predict_csv_and_serve_json_carry_the_threshold_and_its_rule(tmp_path: Path) -> None:
    model = binary_model(tmp_path, 0.5003)
    scans = tmp_path / "scans"
    scans.mkdir()
    for index in range(6):
        class_image(index % 2, index, (16, 16)).save(scans / f"scan{index}.png")

    result = CliRunner().invoke(main, ["predict", str(model), str(scans), "--output", "-", "--device", "cpu"])

    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns[:5]) == ["path", "label", "confidence", "threshold", "rule"]
    assert (table["threshold"] == 0.5003).all()
    rule = "PNEUMONIA if prob_PNEUMONIA >= threshold, else NORMAL (threshold for recall 0.95 on validation)"
    assert (table["rule"] == rule).all()
    assert ((table["prob_PNEUMONIA"] >= table["threshold"]) == (table["label"] == "PNEUMONIA")).all()

    client = TestClient(create_app(load_classifier(str(model), inference_device="cpu"), str(model)))
    files = [("files", (path.name, path.read_bytes(), "image/png")) for path in sorted(scans.iterdir())]
    answers = client.post("/predict", files=files).json()["predictions"]
    assert all(answer["threshold"] == {"PNEUMONIA": 0.5003} and answer["rule"] == rule for answer in answers)
    assert [answer["label"] for answer in answers] == list(table["label"])


def test_multilabel_predictions_carry_each_class_threshold(tmp_path: Path) -> None:
    classifier = multilabel_classifier(tmp_path, [0.5, 0.3, 0.6])

    assert classifier.decision == {
        "threshold_nucleoplasm": 0.5,
        "threshold_cytosol": 0.3,
        "threshold_golgi": 0.6,
        "rule": "every class with prob_<class> >= threshold_<class> (thresholds for max F1 on validation)",
    }
    argmax = ImageClassifier(torch.load(write_checkpoint(tmp_path / "plain.pt"), weights_only=True))
    assert argmax.decision == {"threshold": None, "rule": "the class with the highest probability"}


def test_a_threshold_tuned_on_few_images_of_a_class_is_warned_about(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    labels = np.array([0] * 6 + [1] * 10)
    assert few_images_warning(labels, ["NORMAL", "PNEUMONIA"], 0.924) == (
        "warning: decision threshold 0.924 tuned on 16 validation images (6 NORMAL, 10 PNEUMONIA), fewer than 30 "
        "of a class; it moves with a few images: use a larger validation split, or check it on the test split"
    )
    assert few_images_warning(np.array([0] * 30 + [1] * 31), ["a", "b"], 0.5) is None
    cells = np.zeros((50, 3), dtype=int)
    cells[:12, 0], cells[:40, 1], cells[:, 2] = 1, 1, 1  # 12 with a; 10 without b; c everywhere (not tuned)
    warning = few_images_warning(cells, ["a", "b", "c"], [0.4, 0.5, 0.5])
    assert "a (12 with, 38 without), b (40 with, 10 without);" in warning and "c (" not in warning

    data = prepared_dataset(tmp_path, {"NORMAL": 10, "PNEUMONIA": 10}, mode="L")
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "o")
    fit(config, data, log_model=False)
    assert "tuned on 4 validation images (2 NORMAL, 2 PNEUMONIA), fewer than 30 of a class" in capfd.readouterr().err


# 7. Cross-validation aggregates are named for what they are.


def test_cv_parent_names_the_mean_of_each_folds_best_epoch(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 8, "malignant": 8}, folds=2, fractions=(0.7, 0.1, 0.2))
    config = TrainConfig(epochs=2, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "o")

    result = cross_validate(config, data)

    logged = mlflow.get_run(result.run_id).data.metrics
    folds = [mlflow.get_run(run_id).data.metrics for run_id in result.fold_run_ids]
    assert logged["best_val_loss_mean"] == pytest.approx(np.mean([fold["best_val_loss"] for fold in folds]))
    assert "val_loss_mean" not in logged and "best_val_accuracy_std" in logged
    assert read_info(data).fractions == {"training": 0.8, "validation": 0.0, "test": 0.2}  # its folds validate


# 8. Plots say what they show.


def test_every_report_figure_names_the_split_and_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    titles = []
    real_save = plots._save

    def record(figure, path):
        titles.append((path.name, [figure.get_suptitle(), *(axes.get_title() for axes in figure.axes)]))
        return real_save(figure, path)

    monkeypatch.setattr(plots, "_save", record)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    probabilities = one_hot_probabilities(np.array([0, 1, 2, 0, 1, 1, 0]), 3)
    shows = "test split, run bold-cat-12"

    plots.write_report(tmp_path / "report", labels, probabilities, ["a", "b", "c"], shows=shows)
    plots.write_report(tmp_path / "multi", np.eye(3, dtype=int)[labels], probabilities, ["a", "b", "c"], shows=shows)
    plots.learning_curves(tmp_path / "curves.png", [{"epoch": 0, "val_loss": 1.0}], "val_macro_f1", "run bold-cat-12")
    plots.tsne_png(tmp_path / "tsne.png", np.zeros((7, 2)), labels, ["a", "b", "c"], "validation split", 0.4321)

    assert {name for name, _ in titles} == {
        "confusion_matrix.png",
        "confusion_matrix_normalised.png",
        "roc_curve.png",
        "pr_curve.png",
        "confusion_matrix_per_class.png",
        "reliability_diagram.png",
        "curves.png",
        "tsne.png",
    }
    for name, texts in titles:
        assert any("bold-cat-12" in text or "validation split" in text for text in texts), name
    tsne = dict(titles)["tsne.png"]
    assert any("silhouette 0.432" in text and "validation split" in text for text in tsne)


# 9. Console noise a user cannot act on stays out, and --verbose brings it back.


def test_a_metadata_model_makes_torch_warn_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Initializing zero-element tensors is a no-op" on every metadata model
        create_model("simple_cnn", 3, 3, metadata_width=4)


def test_logging_a_prepared_dataset_warns_nothing_unless_verbose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = prepared_dataset(tmp_path, {"benign": 5, "malignant": 5})
    monkeypatch.delenv(console.VERBOSE, raising=False)

    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        tracking.log_prepared_dataset("quiet", tmp_path, data, {}, read_info(data))
    monkeypatch.setenv(console.VERBOSE, "1")
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        tracking.log_prepared_dataset("loud", tmp_path, data, {}, read_info(data))

    noise = ("interpreted in multiple ways", "Inferred schema contains integer")
    assert not [warning for warning in quiet if any(text in str(warning.message) for text in noise)]
    assert any("Inferred schema contains integer" in str(warning.message) for warning in loud)
    assert not any("multiple ways" in str(warning.message) for warning in loud)  # fixed, not hidden


def test_system_metrics_lines_stay_out_unless_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = logging.getLogger("mlflow.system_metrics")
    level = monitor.level
    monitor.setLevel(logging.NOTSET)
    try:
        monkeypatch.setenv(console.VERBOSE, "1")
        tracking.connect()
        with tracking.start_run("metrics", system_metrics=True):
            pass
        assert monitor.level == logging.NOTSET

        monkeypatch.delenv(console.VERBOSE)
        with tracking.start_run("metrics", system_metrics=True):
            pass
        assert not monitor.isEnabledFor(logging.INFO) and monitor.isEnabledFor(logging.WARNING)
    finally:
        monitor.setLevel(level)


def test_verbose_flag_reaches_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.VERBOSE, raising=False)
    assert not console.verbose()

    result = CliRunner().invoke(main, ["--verbose", "example-data", str(tmp_path / "digits")])

    assert result.exit_code == 0, result.output
    assert console.verbose()  # and so do the worker processes prepare and search start


def test_in_a_log_only_the_outer_progress_bar_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)

    with console.progress(total=2, desc="epochs") as outer, console.progress(total=5, desc="training") as inner:
        assert not outer.disable and inner.disable
    assert "epochs" in log.getvalue() and "training" not in log.getvalue()


def test_the_writing_bar_rate_counts_from_when_the_work_began(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    started = time.time()
    time.sleep(0.5)  # the images were converted while the splits were drawn: all ready when the bar is first read

    bar = _progress(iter(range(50)), 50, "writing", started)
    list(bar)

    rate = float(re.search(r"([\d.]+)image/s", str(bar)).group(1))
    assert rate <= 100  # 50 images in at least 0.5 s, not hundreds of thousands a second


def test_evaluate_of_an_untrained_model_runs_quietly(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    counts = {"training": {"mel": 4, "nv": 4}, "validation": {"mel": 2, "nv": 2}, "test": {"mel": 3, "nv": 1}}
    data = tmp_path / "prepared"
    prepare(write_split_folders(tmp_path / "ham", counts), data, PrepareConfig(size=16, workers=1))
    model = write_checkpoint(tmp_path / "model.pt", classes=("mel", "nv"), size=16)

    result = evaluate(EvaluateConfig(bootstrap=30, device="cpu"), str(model), data)

    assert result.absent == []
    sklearn_warnings = [warning for warning in recwarn if "sklearn" in warning.filename]
    assert sklearn_warnings == []  # the metrics on a small imbalanced split divide by no zero
