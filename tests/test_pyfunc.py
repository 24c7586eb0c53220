"""The logged pyfunc model: raw images in, the checkpoint's own probabilities out, errors kept in their rows."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import class_image, write_checkpoint
from PIL import Image

from classifier.data.transforms import Normalise, image_to_tensor
from classifier.errors import UserError
from classifier.model.pyfunc import KEPT_KEYS, load_classifier, log_classifier_model
from classifier.nets.models import model_from_checkpoint

CLASSES = ["benign", "malignant"]
PROBABILITIES = [f"prob_{name}" for name in CLASSES]


def png_bytes(label: int, index: int) -> bytes:
    buffer = io.BytesIO()
    class_image(label, index).save(buffer, format="PNG")
    return buffer.getvalue()


def checkpoint_probabilities(checkpoint: Path, images: list[bytes], flips: tuple[int, ...] = ()) -> np.ndarray:
    """What the checkpoint's network says about 32 px RGB images, through training's own tensor path, averaged over
    the views flipped along `flips` (-1 left-right, -2 upside down) beside the image as is."""
    state = torch.load(checkpoint, weights_only=True)
    network = model_from_checkpoint(state)
    normalise = Normalise(state["preprocessing"]["mean"], state["preprocessing"]["std"])
    batch = normalise(torch.stack([image_to_tensor(Image.open(io.BytesIO(image)), 8) for image in images]))
    views = [batch, *(batch.flip(dim) for dim in flips)]
    with torch.no_grad():
        return torch.stack([network(view).softmax(dim=1) for view in views]).mean(dim=0).numpy()


@pytest.fixture
def model_uri(checkpoint: Path, experiment: str) -> str:
    with mlflow.start_run(experiment_id=experiment):
        return log_classifier_model(checkpoint).model_uri


def test_logged_model_gives_the_checkpoints_probabilities(checkpoint, model_uri):
    images = [png_bytes(label, index) for label in (0, 1) for index in range(3)]
    expected = checkpoint_probabilities(checkpoint, images)

    predictions = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))

    assert list(predictions.columns) == ["label", "confidence", *PROBABILITIES, "error"]
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), expected, atol=1e-6)
    assert list(predictions["label"]) == [CLASSES[index] for index in expected.argmax(axis=1)]
    np.testing.assert_allclose(predictions["confidence"], expected.max(axis=1), atol=1e-6)
    assert predictions["error"].isna().all()


def test_bytes_base64_data_uri_and_path_give_the_same_prediction(model_uri, tmp_path):
    image = png_bytes(1, 0)
    (tmp_path / "x.png").write_bytes(image)
    encoded = base64.b64encode(image).decode("ascii")
    cells = [image, encoded, base64.encodebytes(image).decode("ascii"), f"data:image/png;base64,{encoded}"]
    cells.append(str(tmp_path / "x.png"))

    predictions = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": cells}))

    assert predictions["error"].isna().all()
    assert predictions["label"].nunique() == 1
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), predictions[PROBABILITIES].iloc[[0] * 5])


def test_unreadable_images_are_reported_in_their_rows_only(checkpoint, model_uri, tmp_path):
    good = [png_bytes(0, 1), png_bytes(1, 1)]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    cells = [good[0], b"plain text", str(tmp_path / "corrupt.png"), "no-such-file.png", good[1]]

    predictions = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": cells}))

    assert list(predictions["error"].notna()) == [False, True, True, True, False]
    assert "corrupt.png" in predictions.loc[2, "error"]
    assert "no-such-file.png" in predictions.loc[3, "error"]
    assert predictions.loc[1:3, "label"].isna().all() and predictions.loc[1:3, PROBABILITIES].isna().all().all()
    expected = checkpoint_probabilities(checkpoint, good)
    np.testing.assert_allclose(predictions.loc[[0, 4], PROBABILITIES].to_numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(("recipe", "flips"), [("light", (-1,)), ("strong", (-1, -2)), ("none", ())])
def test_tta_averages_only_the_flips_the_model_was_trained_with(checkpoint, experiment, recipe, flips):
    """No upside-down view of an x-ray for a model trained with left-right flips only (`light`)."""
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["augment"] = recipe
    torch.save(state, checkpoint)
    with mlflow.start_run(experiment_id=experiment):
        model_uri = log_classifier_model(checkpoint).model_uri
    images = [png_bytes(0, 2), png_bytes(1, 2)]

    plain = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    tta = mlflow.pyfunc.load_model(model_uri, model_config={"tta": True}).predict(pd.DataFrame({"image": images}))

    expected = checkpoint_probabilities(checkpoint, images, flips)
    np.testing.assert_allclose(tta[PROBABILITIES].to_numpy(), expected, atol=1e-6)
    assert np.allclose(tta[PROBABILITIES].to_numpy(), plain[PROBABILITIES].to_numpy()) == (recipe == "none")


def test_stored_threshold_decides_the_binary_label(tmp_path):
    image = png_bytes(0, 3)
    positive = float(
        load_classifier(str(write_checkpoint(tmp_path / "plain.pt"))).predict([image]).loc[0, "prob_malignant"]
    )

    for threshold, label in [(positive - 1e-3, "malignant"), (positive + 1e-3, "benign")]:
        checkpoint = write_checkpoint(tmp_path / f"{threshold}.pt", threshold=threshold)
        prediction = load_classifier(str(checkpoint)).predict([image]).loc[0]
        assert prediction["label"] == label
        assert prediction["confidence"] == pytest.approx(prediction[f"prob_{label}"])


def test_logged_model_is_self_contained(model_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # nothing in the model is pickled
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["label", "confidence", *PROBABILITIES, "error"]
    assert info.metadata == {
        "classes": CLASSES,
        "threshold": None,
        "threshold_rule": None,
        "threshold_prevalence": None,
        "positive_class": None,
        "temperature": None,
    }

    folder = Path(mlflow.artifacts.download_artifacts(model_uri))
    stored = torch.load(folder / "artifacts" / "checkpoint.pt", weights_only=True)
    assert set(stored) <= set(KEPT_KEYS)  # no optimizer state in the served model
    assert (folder / "code" / "classifier" / "pyfunc.py").is_file()

    example = json.loads((folder / "serving_input_example.json").read_text())["dataframe_split"]
    result = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame(example["data"], columns=example["columns"]))
    assert result.loc[0, "label"] in CLASSES


def test_unusable_models_are_refused_with_their_name(tmp_path):
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, not_a_checkpoint)
    with pytest.raises(UserError, match="weights.pt: not a classifier checkpoint"):
        load_classifier(str(not_a_checkpoint))
    with pytest.raises(UserError, match="models:/nothing@champion: cannot load"):
        load_classifier("models:/nothing@champion")


def test_the_served_model_reads_an_exif_rotated_jpeg_upright(checkpoint: Path) -> None:
    upright = class_image(1, 0, (32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90° anticlockwise: view it turned 90° clockwise
    tagged = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(tagged, format="JPEG", exif=exif, quality=95)
    plain = io.BytesIO()
    upright.save(plain, format="JPEG", quality=95)
    classifier = load_classifier(str(checkpoint))

    rotated, reference = (classifier.preprocess(buffer.getvalue()) for buffer in (tagged, plain))

    assert (rotated - reference).abs().mean() < 0.03  # JPEG noise only, not a turned image
