"""Metadata as auxiliary inputs (HAM10000 style): CSV columns fused with the image, through train, register, predict."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from test_serve import BIN, running

from classifier.cli import main
from classifier.config import PrepareConfig, TrainConfig
from classifier.data.layout import read_info, read_manifest
from classifier.data.metadata import encode, fit_encoding
from classifier.data.prepare import prepare
from classifier.errors import UserError
from classifier.learn.train import fit
from classifier.model.pyfunc import load_classifier

SITES = ["back", "face", "trunk"]


def lesion_csv(root: Path, count: int = 72) -> Path:
    """The same image for every lesion, whose class only age tells (old: malignant); a few ages missing, sex sometimes
    unknown, two images per lesion id."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    pixels = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)  # one image for all
    rows = []
    for index in range(count):
        malignant = index % 2 == 1
        Image.fromarray(pixels).save(root / "images" / f"isic_{index:03d}.png")
        age = "" if index % 17 == 0 else str(int(rng.integers(60, 85) if malignant else rng.integers(20, 45)))
        rows.append(
            {
                "path": f"images/isic_{index:03d}.png",
                "label": "malignant" if malignant else "benign",
                "lesion_id": f"lesion_{index // 2:03d}_{int(malignant)}",
                "age": age,
                "sex": ["male", "female", "unknown"][index % 3],
                "site": SITES[index % 3],
            }
        )
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root / "metadata.csv"


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lesions")
    config = PrepareConfig(size=16, fractions=[0.6, 0.2, 0.2], group_column="lesion_id", seed=1)
    prepare(lesion_csv(root), root / "prepared", config)
    return root


def test_encoding_standardises_numbers_and_one_hots_categories_with_missing_values():
    table = pd.DataFrame({"age": ["30", "50", "", "70"], "sex": ["male", "female", "unknown", "male"]})
    encodings = fit_encoding(table, ["age", "sex"])
    assert [(e.name, e.kind) for e in encodings] == [("age", "numeric"), ("sex", "categorical")]
    assert encodings[1].categories == ["female", "male"]  # 'unknown' is a missing value

    new = pd.DataFrame({"age": ["50", "n/a"], "sex": ["other", "female"]})
    encoded = encode(new, encodings)
    # age: standardised value and missing flag; sex: female, male, other-or-missing
    np.testing.assert_allclose(encoded, [[0, 0, 0, 0, 1], [0, 1, 1, 0, 0]], atol=1e-6)
    with pytest.raises(UserError, match="missing metadata columns sex"):
        encode(new[["age"]], encodings, "request")


def test_metadata_model_learns_what_images_cannot_show_and_serves_with_metadata(lesions, tmp_path):
    data = lesions / "prepared"
    manifest = read_manifest(data)
    assert {"age", "sex", "site"} <= set(manifest.columns)
    assert manifest.groupby("group")["split"].nunique().max() == 1  # a lesion never straddles two splits
    assert read_info(data).metadata_columns == ["age", "sex", "site"]

    def train(metadata: list[str] | None):
        config = TrainConfig(
            epochs=12,
            batch_size=16,
            lr=0.01,
            augment="none",
            monitor="val_loss",
            metadata=metadata,
            output_dir=tmp_path / "outputs",
        )
        return fit(config, data, log_model=metadata is not None)

    image_only = train(None).best_metrics
    result = train(["age", "sex", "site"])
    assert image_only["val_roc_auc"] <= 0.6 and image_only["val_accuracy"] <= 0.6  # one image for all: chance
    assert result.best_metrics["val_roc_auc"] >= 0.9 and result.best_metrics["val_accuracy"] >= 0.8

    registered = mlflow.register_model(result.model_uri, "lesions")
    uri = f"models:/lesions/{registered.version}"
    model = mlflow.pyfunc.load_model(uri)
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image", "age", "sex", "site"]

    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images = [base64.b64encode((data / path).read_bytes()).decode() for path in test["path"]]
    ages = pd.to_numeric(test["age"], errors="coerce").astype("Int64")  # integers, missing where unknown
    predictions = model.predict(pd.DataFrame({"image": images, "age": ages, "sex": test["sex"], "site": test["site"]}))
    known_age = test["age"] != ""
    assert (predictions["label"][known_age] == test["label"][known_age]).mean() >= 0.8
    with pytest.raises(Exception, match="missing metadata columns age"):
        model.predict(pd.DataFrame({"image": images, "sex": test["sex"], "site": test["site"]}))

    # The command line takes the metadata from a CSV beside the paths.
    listing = tmp_path / "to_predict.csv"
    test.assign(path=[str(data / path) for path in test["path"]])[["path", "age", "sex", "site"]].to_csv(listing)
    output = tmp_path / "predictions.csv"
    run = CliRunner().invoke(main, ["predict", uri, str(listing), "--output", str(output)])
    assert run.exit_code == 0, run.output
    written = pd.read_csv(output)
    assert list(written["label"]) == list(predictions["label"])

    folder = CliRunner().invoke(main, ["predict", uri, str(data / "test")])
    assert folder.exit_code != 0
    assert "also takes metadata (age, sex, site); pass a CSV" in folder.output
    assert load_classifier(uri).metadata_columns == ["age", "sex", "site"]


def test_training_with_a_metadata_column_the_dataset_lacks_fails_naming_it(lesions, tmp_path):
    run = CliRunner().invoke(
        main,
        ["train", str(lesions / "prepared"), "--metadata", "age,body_site", "--epochs", "1"],
    )
    assert run.exit_code != 0
    assert "metadata columns body_site are not in" in run.output
    assert "it has age, sex, site" in run.output


def test_http_service_takes_metadata_as_a_json_form_field(lesions, tmp_path):
    data = lesions / "prepared"
    config = TrainConfig(epochs=1, batch_size=16, augment="none", metadata=["age", "sex"], output_dir=tmp_path / "o")
    checkpoint = fit(config, data, log_model=False).checkpoint
    manifest = read_manifest(data).head(2)
    files = [("files", (Path(path).name, (data / path).read_bytes())) for path in manifest["path"]]
    rows = [{"age": age, "sex": sex} for age, sex in zip(manifest["age"], manifest["sex"], strict=True)]
    command = [str(BIN / "classifier"), "serve", str(checkpoint), "--port", "{port}"]

    with running(command, "/health", tmp_path / "serve.log") as url:
        answered = requests.post(f"{url}/predict", files=files, data={"metadata": json.dumps(rows)})
        missing = requests.post(f"{url}/predict", files=files, data={"metadata": json.dumps({"age": 50})})
        health = requests.get(f"{url}/health").json()

    assert answered.status_code == 200, answered.text
    expected = load_classifier(str(checkpoint)).predict(
        [data / path for path in manifest["path"]], metadata=pd.DataFrame(rows)
    )
    got = answered.json()["predictions"]
    assert [prediction["label"] for prediction in got] == list(expected["label"])
    np.testing.assert_allclose([prediction["confidence"] for prediction in got], expected["confidence"], atol=1e-5)
    assert missing.status_code == 422 and "missing metadata columns sex" in missing.json()["detail"]
    assert health["metadata_columns"] == ["age", "sex"]
