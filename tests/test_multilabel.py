"""Multi-label, 4-channel data (Human Protein Atlas style): per-channel files, label lists, iterative stratification,
sigmoid training with per-class thresholds, and the register -> predict round trip."""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import f1_score

from classifier.cli import main
from classifier.config import EmbedConfig, EnsembleConfig, EvaluateConfig, PrepareConfig, TrainConfig
from classifier.data.layout import read_info, read_manifest
from classifier.data.prepare import prepare
from classifier.errors import UserError
from classifier.evaluation.embed import embed
from classifier.evaluation.evaluate import evaluate
from classifier.learn.cv import cross_validate
from classifier.learn.train import fit
from classifier.model.pyfunc import load_classifier
from classifier.tune.ensemble import build_ensemble

CHANNELS = ["red", "green", "blue", "yellow"]
CLASSES = ["nucleoplasm", "mitochondria", "cytosol", "golgi"]


def rgby_images(root: Path, count: int = 64) -> Path:
    """`count` cells as four grey files each; class k lights up channel k. Labels are HPA-style index lists."""
    rng = np.random.default_rng(0)
    folder = root / "train"
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        present = sorted(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
        for channel, name in enumerate(CHANNELS):
            pixels = rng.normal(40, 10, (16, 16))
            if channel in present:
                pixels[4:12, 4:12] += 160
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"cell{index:03d}_{name}.png")
        rows.append({"Id": f"train/cell{index:03d}", "Target": " ".join(map(str, present))})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def rgby_config(**options) -> PrepareConfig:
    values = dict(size=16, path_column="Id", label_column="Target", multi_label=True, channel_files=CHANNELS, seed=3)
    return PrepareConfig(**{**values, "class_names": CLASSES, "fractions": [0.6, 0.2, 0.2], **options})


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    csv = rgby_images(root)
    prepare(csv, root / "prepared", rgby_config())
    return root


def test_prepare_stacks_channel_files_and_stratifies_every_label(cells):
    data = cells / "prepared"
    info = read_info(data)
    assert (info.task, info.channels, info.classes) == ("multi_label", 4, CLASSES)  # index k is --class-names[k]
    manifest = read_manifest(data)
    source = pd.read_csv(cells / "train.csv", dtype=str)
    expected = {row.Id: " ".join(CLASSES[int(i)] for i in sorted(row.Target.split())) for row in source.itertuples()}
    assert dict(zip(manifest["source"], manifest["label"], strict=True)) == expected

    first = manifest.iloc[0]
    stacked = np.asarray(Image.open(data / first["path"]))
    assert stacked.shape == (16, 16, 4)
    for channel, name in enumerate(CHANNELS):  # channel k of the PNG is the file <id>_<k-th name>
        original = np.asarray(Image.open(cells / f"{first['source']}_{name}.png"))
        np.testing.assert_array_equal(stacked[..., channel], original)

    per_split = {split: rows["label"].str.split().explode().value_counts() for split, rows in manifest.groupby("split")}
    for name in CLASSES:  # iterative stratification: every label in every split, near its share
        assert all(counts.get(name, 0) > 0 for counts in per_split.values())
        share = per_split["training"][name] / sum(per_split[split][name] for split in per_split)
        assert 0.45 <= share <= 0.75


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_names": CLASSES[:3]}, r"row 4: '1 3'.* name classes not in --class-names"),
        ({"channel_files": ["red", "green", "blue", "cyan"]}, r"row 2: train/cell000_\{cyan\}.* missing channel files"),
    ],
)
def test_bad_label_lists_and_missing_channel_files_fail_naming_rows(cells, tmp_path, change, message):
    with pytest.raises(UserError, match=message) as failure:
        prepare(cells / "train.csv", tmp_path / "out", rgby_config(**change))
    assert "\n" not in failure.value.message
    assert not (tmp_path / "out").exists()


def test_multilabel_model_tunes_a_threshold_per_class_and_round_trips_through_the_registry(cells, tmp_path):
    data = cells / "prepared"
    config = TrainConfig(
        epochs=6, batch_size=16, lr=0.01, augment="none", loss="focal", output_dir=tmp_path / "outputs"
    )
    result = fit(config, data)

    assert result.monitor == "val_macro_f1" and result.best_metrics["val_macro_f1"] >= 0.7
    run = mlflow.get_run(result.run_id)
    for name in CLASSES:
        assert {f"val_f1_{name}", f"val_roc_auc_{name}", f"decision_threshold_{name}"} <= set(run.data.metrics)
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["task"] == "multi_label" and len(checkpoint["threshold"]) == len(CLASSES)
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/confusion_matrix_per_class.png" in artifacts

    registered = mlflow.register_model(result.model_uri, "cells")
    uri = f"models:/cells/{registered.version}"
    manifest = read_manifest(data)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images = [base64.b64encode((data / path).read_bytes()).decode() for path in test["path"]]
    predictions = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))

    classifier = load_classifier(uri)
    assert classifier.classes == CLASSES and list(predictions.columns[2:6]) == [f"prob_{name}" for name in CLASSES]
    probabilities = predictions[[f"prob_{name}" for name in classifier.classes]].to_numpy()
    thresholds = np.asarray(checkpoint["threshold"])
    for row, label in zip(probabilities, predictions["label"], strict=True):  # each class at its own threshold
        assert label.split() == [name for name, p, t in zip(classifier.classes, row, thresholds, strict=True) if p >= t]
    exact = (predictions["label"] == test["label"]).mean()
    assert exact >= 0.6  # whole label sets right on most unseen cells

    output = tmp_path / "predictions.csv"
    run = CliRunner().invoke(main, ["predict", uri, str(data / "test"), "--output", str(output)])
    assert run.exit_code == 0, run.output
    assert len(pd.read_csv(output)) == len(test)

    # The channel files themselves, listed by stem, give the same answers; a stem without files fails only its row.
    stems = cells / "stems.csv"
    pd.DataFrame({"path": [*test["source"], "train/no_such_cell"]}).to_csv(stems, index=False)
    output = tmp_path / "from_channels.csv"
    run = CliRunner().invoke(
        main, ["predict", uri, str(stems), "--channel-files", ",".join(CHANNELS), "-o", str(output)]
    )
    assert run.exit_code == 0, run.output
    from_channels = pd.read_csv(output, keep_default_na=False)
    assert list(from_channels["label"][:-1]) == list(predictions["label"])
    assert "no_such_cell_red.png" in from_channels["error"].iloc[-1] and from_channels["label"].iloc[-1] == ""

    # evaluate scores at the tuned thresholds (the labels predict gives); embed colours each cell by a class.
    evaluated = evaluate(EvaluateConfig(bootstrap=20), uri, data)
    truth = np.array([[name in row.split() for name in classifier.classes] for row in test["label"]], dtype=int)
    predicted = np.array([[name in row.split() for name in classifier.classes] for row in predictions["label"]])
    assert evaluated.metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert evaluated.metrics["accuracy"] == pytest.approx(exact)
    embedded = embed(EmbedConfig(split="test"), str(result.checkpoint), data)
    assert embedded.embeddings.shape[0] == len(test) and embedded.points.shape == (len(test), 2)


def test_an_image_with_another_channel_count_than_the_model_is_an_error_in_its_row(cells, tmp_path):
    data = cells / "prepared"
    result = fit(TrainConfig(epochs=1, batch_size=16, augment="none", output_dir=tmp_path / "o"), data, log_model=False)
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (16, 16), "white").save(rgb)
    table = load_classifier(str(result.checkpoint)).predict([rgb])
    assert "3 channels" in table.loc[0, "error"] and "takes 4" in table.loc[0, "error"]
    assert pd.isna(table.loc[0, "label"])


def test_an_ensemble_of_multilabel_models_averages_their_sigmoids(cells, tmp_path):
    data = cells / "prepared"
    runs = [
        fit(TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=seed, augment="none", output_dir=tmp_path / "o"), data)
        for seed in (1, 2)
    ]
    result = build_ensemble(EnsembleConfig(runs=[run.run_id for run in runs], split="test"), data)
    assert isinstance(result.threshold, list) and len(result.threshold) == len(CLASSES)

    manifest = read_manifest(data)
    test = manifest[manifest["split"] == "test"]
    images = [(data / path).read_bytes() for path in test["path"]]
    columns = [f"prob_{name}" for name in CLASSES]
    members = [load_classifier(str(run.checkpoint)).predict(images)[columns].to_numpy() for run in runs]
    predicted = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": images}))
    np.testing.assert_allclose(predicted[columns].to_numpy(), np.mean(members, axis=0), atol=1e-5)
    assert set(result.table["model"]) == {"ensemble", "member0", "member1"}


def test_cross_validation_of_multilabel_folds_scores_every_class_out_of_fold(cells, tmp_path):
    folded = tmp_path / "folded"
    prepare(cells / "train.csv", folded, rgby_config(folds=2, fractions=[0.8, 0.0, 0.2]))
    manifest = read_manifest(folded)
    training = manifest[manifest["split"] == "training"]
    assert sorted(training["fold"].unique()) == [0, 1]
    for fold, rows in training.groupby("fold"):  # iterative stratification: each fold holds every class
        assert set(rows["label"].str.split().explode()) == set(CLASSES), fold

    result = cross_validate(TrainConfig(epochs=1, batch_size=16, augment="none", output_dir=tmp_path / "o"), folded)
    assert len(result.fold_run_ids) == 2
    assert {f"f1_{name}" for name in CLASSES} <= set(result.out_of_fold)
    assert 0 <= result.out_of_fold["macro_f1"] <= 1
