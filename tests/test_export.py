"""`classifier export --format onnx`: the graph answers the probabilities PyTorch does, carries what a consumer needs
in its metadata, and lands as an artifact of the run the model came from."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from conftest import class_image, write_checkpoint

from classifier.cli import main
from classifier.data.metadata import ColumnEncoding, to_plain
from classifier.errors import UserError
from classifier.evaluation.export import TOLERANCE, export
from classifier.model.pyfunc import load_classifier, log_classifier_model
from classifier.nets.models import create_model

# The check the export runs, and these tests repeat on real images: float32 graphs agree to about 1e-7; 1e-4 leaves
# room for other kernels (onnxruntime's fused convolutions) and is far below what changes a decision.
assert TOLERANCE == 1e-4


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_gives_the_probabilities_of_the_pytorch_model_on_real_images(tmp_path: Path):
    checkpoint = write_checkpoint(tmp_path / "model.pt", threshold=0.4)
    images = [class_image(label, index) for label, index in ((0, 1), (1, 2), (1, 5))]
    for number, image in enumerate(images):
        image.save(tmp_path / f"{number}.png")
    classifier = load_classifier(str(checkpoint))
    expected = classifier.predict([str(tmp_path / f"{number}.png") for number in range(3)])

    result = CliRunner().invoke(main, ["export", str(checkpoint), "--output", str(tmp_path / "model.onnx")])

    assert result.exit_code == 0, result.output
    assert "onnxruntime matches PyTorch within" in result.output and "tolerance 0.0001" in result.output
    batch = torch.stack([classifier.preprocess(tmp_path / f"{number}.png") for number in range(3)]).numpy()
    for rows in (batch, batch[:1]):  # the batch axis is dynamic
        (probabilities,) = session(tmp_path / "model.onnx").run(["probabilities"], {"image": rows})
        wanted = expected[["prob_benign", "prob_malignant"]].to_numpy()[: len(rows)]
        assert np.abs(probabilities - wanted).max() <= TOLERANCE


def test_the_metadata_says_how_to_feed_and_read_the_graph(tmp_path: Path):
    checkpoint = torch.load(write_checkpoint(tmp_path / "model.pt", threshold=0.4), weights_only=True)
    checkpoint["temperature"] = 2.0  # a calibrated model
    checkpoint.update(positive_class="malignant", threshold_rule="youden", threshold_prevalence=0.3)
    torch.save(checkpoint, tmp_path / "calibrated.pt")

    result = export(str(tmp_path / "calibrated.pt"), tmp_path / "out" / "calibrated.onnx")

    props = {prop.key: prop.value for prop in onnx.load(str(result.path)).metadata_props}
    assert json.loads(props["classes"]) == ["benign", "malignant"] and json.loads(props["threshold"]) == 0.4
    assert json.loads(props["positive_class"]) == "malignant" and json.loads(props["threshold_rule"]) == "youden"
    assert json.loads(props["threshold_prevalence"]) == 0.3
    preprocessing = json.loads(props["preprocessing"])
    assert preprocessing["mean"] == [0.5] * 3 and preprocessing["std"] == [0.25] * 3 and preprocessing["size"] == 32
    assert json.loads(props["calibration"]) == {"temperature": 2.0}
    assert result.max_abs_difference <= TOLERANCE and result.run_id is None
    image = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    network = create_model("simple_cnn", 2, 3)
    network.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        logits = network.eval()((torch.from_numpy(image) - 0.5) / 0.25)
    (probabilities,) = session(result.path).run(None, {"image": image})
    np.testing.assert_allclose(probabilities, (logits / 2.0).softmax(1).numpy(), atol=TOLERANCE)


def test_a_metadata_model_exports_with_both_inputs(tmp_path: Path):
    encodings = [ColumnEncoding("age", "numeric", 50.0, 10.0), ColumnEncoding("sex", "categorical", categories=["f"])]
    checkpoint = torch.load(write_checkpoint(tmp_path / "model.pt"), weights_only=True)
    width = 2 + 2  # age and its missing flag; f and the other slot
    network = create_model("simple_cnn", 2, 3, metadata_width=width)
    checkpoint.update(state_dict=network.state_dict(), metadata=to_plain(encodings))
    torch.save(checkpoint, tmp_path / "fused.pt")

    result = export(str(tmp_path / "fused.pt"), tmp_path / "fused.onnx")

    inputs = [item.name for item in session(result.path).get_inputs()]
    assert inputs == ["image", "metadata"] and result.max_abs_difference <= TOLERANCE
    props = {prop.key: prop.value for prop in onnx.load(str(result.path)).metadata_props}
    assert [column["name"] for column in json.loads(props["metadata_encoding"])] == ["age", "sex"]


def test_export_of_a_logged_model_is_logged_to_its_run(tmp_path: Path, experiment: str):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    with mlflow.start_run(experiment_id=experiment) as run:
        log_classifier_model(checkpoint)

    result = export(f"runs:/{run.info.run_id}/model", tmp_path / "exported.onnx")

    assert result.run_id == run.info.run_id
    logged = [item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "export")]
    assert logged == ["export/exported.onnx"]


def test_an_unsupported_format_or_model_writes_nothing(tmp_path: Path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "none.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "none.pt" in result.output
    with pytest.raises(UserError, match="--format tflite: unsupported; use one of onnx"):
        export(str(write_checkpoint(tmp_path / "model.pt")), tmp_path / "m.tflite", format="tflite")
    assert not list(tmp_path.glob("*onnx*")) and not list(tmp_path.glob(".*partial"))
