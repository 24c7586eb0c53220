"""Grad-CAM explanations: the target layers found, maps that point where the evidence is, `classifier explain`,
`POST /explain`, and the explained grid that training and `evaluate` log."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import class_image, write_checkpoint
from PIL import Image
from prepared import prepared_dataset
from torch import nn

from classifier.cli import main
from classifier.config import EvaluateConfig, TrainConfig
from classifier.evaluation.evaluate import evaluate
from classifier.learn.explained import choose_examples
from classifier.learn.train import fit
from classifier.model.gradcam import grad_cam, target_layers
from classifier.model.pyfunc import load_classifier
from classifier.nets.ensemble import Ensemble
from classifier.nets.models import create_model

warnings.filterwarnings("ignore", module="pydicom")


def test_the_last_convolutional_stage_of_each_kind_of_network():
    simple = create_model("simple_cnn", 2, 3)
    assert target_layers(simple) == [[m for m in simple.features if isinstance(m, nn.ReLU)][-1]]
    resnet = create_model("resnet18", 2, 3)
    assert target_layers(resnet) == [resnet.layer4]
    fused = create_model("resnet18", 2, 3, metadata_width=4)
    assert target_layers(fused) == [fused.backbone.layer4]
    members = [create_model("simple_cnn", 2, 3), create_model("resnet18", 2, 3)]
    assert target_layers(Ensemble(members)) == [target_layers(members[0])[0], members[1].layer4]


def brightness_network() -> nn.Module:
    """Class 1's logit is the mean brightness, class 0's its negative: class 1's evidence is where it is bright."""
    convolution = nn.Conv2d(1, 1, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        convolution.weight.fill_(1.0), convolution.bias.zero_()
        head.weight.copy_(torch.tensor([[-1.0], [1.0]])), head.bias.zero_()
    return nn.Sequential(convolution, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def test_the_map_points_at_the_evidence_for_the_class_asked_for():
    image = torch.zeros(1, 1, 32, 32)
    image[..., :8, :8] = 1.0  # a bright square in the top-left corner

    bright = grad_cam(brightness_network(), image, [1])[0]
    against = grad_cam(brightness_network(), image, [0])[0]

    assert bright.shape == (32, 32) and bright.max() == pytest.approx(1.0)
    assert bright[:8, :8].mean() > 0.9 and bright[16:, 16:].max() < 0.05
    assert np.allclose(against, 0)  # nothing in the image speaks for class 0


def test_maps_equal_plain_pytorch_grad_cam_and_the_weights_stay_trainable():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    network = create_model("resnet18", 3, 3).eval()
    images = torch.randn(2, 3, 64, 64)
    plain = GradCAM(model=network, target_layers=[network.layer4])
    expected = plain(input_tensor=images, targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    plain.activations_and_grads.release()

    maps = grad_cam(network, images, [2, 0])  # weights frozen meanwhile: the backward pass starts at layer4

    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert all(parameter.requires_grad for parameter in network.parameters())
    assert not any(module._forward_hooks for module in network.modules())


def test_grad_cam_of_resnet18_and_a_metadata_model_run_end_to_end():
    images = torch.randn(2, 3, 64, 64)
    maps = grad_cam(create_model("resnet18", 3, 3).eval(), images, [0, 2])
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    fused = create_model("simple_cnn", 2, 3, metadata_width=3).eval()
    maps = grad_cam(fused, images, [1, 1], torch.randn(2, 3))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


def test_choose_examples_takes_the_most_confident_right_and_wrong_of_each_class():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.55, 0.45]])
    chosen = choose_examples(labels, probabilities, ["cat", "dog"])
    assert [(row, target) for row, target, _ in chosen] == [(0, 0), (2, 1), (4, 1), (5, 0)]
    assert chosen[1][2] == "wrong: cat -> dog 0.80"
    with_threshold = choose_examples(labels, probabilities, ["cat", "dog"], thresholds=0.3)  # dog from 0.3 on
    assert [(row, target) for row, target, _ in with_threshold] == [(0, 0), (2, 1), (4, 1)]


def test_explain_command_writes_an_overlay_and_a_map_per_image(tmp_path: Path):
    from test_dicom import ramp, write_dicom

    checkpoint = write_checkpoint(tmp_path / "model.pt", size=32, channels=3)
    scans = tmp_path / "scans"
    scans.mkdir()
    class_image(0, 0).save(scans / "a.png")
    class_image(1, 0).save(scans / "b.jpg")
    write_dicom(scans / "IM0003", ramp(32, 32))
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"

    result = CliRunner().invoke(
        main, ["explain", str(checkpoint), str(scans), "--output", str(out), "--target-class", "malignant"]
    )

    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "explanations.csv")
    assert len(table) == 4
    bad = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert "broken.png" in bad["error"] and pd.isna(bad["overlay"])
    good = table[table["error"].isna()]
    assert set(good["overlay"]) == {"a.png", "b.png", "IM0003.png"} and (good["explained_class"] == "malignant").all()
    for _, row in good.iterrows():
        heat = np.load(out / row["heatmap"])
        assert heat.shape == (32, 32) and heat.dtype == np.float32 and 0 <= heat.min() <= heat.max() <= 1
        assert Image.open(out / row["overlay"]).mode == "RGB" and Image.open(out / row["overlay"]).size == (32, 32)
    classifier = load_classifier(str(checkpoint))
    probabilities = classifier.predict([str(scans / "a.png")])["prob_malignant"][0]
    assert good[good["path"].str.endswith("a.png")]["probability"].iloc[0] == pytest.approx(probabilities, abs=1e-5)
    assert not list(out.glob(".*partial"))


def test_explain_refuses_an_unknown_class_before_writing(tmp_path: Path):
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    class_image(0, 0).save(tmp_path / "a.png")
    result = CliRunner().invoke(
        main, ["explain", str(checkpoint), str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--target-class", "x"]
    )
    assert result.exit_code == 1 and "--target-class x: not a class of this model; use one of benign, malignant" in (
        result.output
    )
    assert not (tmp_path / "out").exists()


def test_post_explain_answers_a_png_or_json_and_rejects_a_bad_file(tmp_path: Path):
    from fastapi.testclient import TestClient

    from classifier.serving.http import create_app

    checkpoint = write_checkpoint(tmp_path / "model.pt")
    client = TestClient(create_app(load_classifier(str(checkpoint)), str(checkpoint)))
    buffer = io.BytesIO()
    class_image(1, 3).save(buffer, format="PNG")
    upload = {"file": ("lesion.png", buffer.getvalue(), "image/png")}

    as_png = client.post("/explain", files=upload)
    as_json = client.post("/explain", files=upload, data={"format": "json", "target_class": "benign"})
    broken = client.post("/explain", files={"file": ("x.png", b"not an image", "image/png")})
    unknown = client.post("/explain", files=upload, data={"target_class": "nope"})

    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(as_png.content)).size == (32, 32)
    body = as_json.json()
    assert body["file"] == "lesion.png" and body["explained_class"] == "benign"
    assert body["probability"] == pytest.approx(body["probabilities"]["benign"])
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"]))).mode == "RGB"
    assert broken.status_code == 415 and broken.json()["file"] == "x.png" and "x.png" in broken.json()["detail"]
    assert unknown.status_code == 422 and "nope" in unknown.json()["detail"]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("explained"), {"benign": 12, "malignant": 12}, size=32)


def artifacts(run_id: str) -> set[str]:
    return {item.path for item in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")}


def test_training_and_evaluate_log_the_explained_grid(two_classes: Path, tmp_path: Path):
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out")
    trained = fit(config, two_classes)
    assert "evaluation/explained.png" in artifacts(trained.run_id)

    evaluation = evaluate(EvaluateConfig(bootstrap=0), str(trained.checkpoint), two_classes)
    assert "evaluation/explained.png" in artifacts(evaluation.run_id)
    grid = mlflow.artifacts.download_artifacts(run_id=evaluation.run_id, artifact_path="evaluation/explained.png")
    assert Image.open(grid).size[0] > 200


def test_a_network_grad_cam_cannot_explain_warns_and_the_run_still_finishes(two_classes, tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "model.pt")

    def fails(*_args, **_kwargs):
        raise RuntimeError("Invalid activation shape. Get 3.")

    monkeypatch.setattr("classifier.learn.explained.grad_cam", fails)
    with pytest.warns(UserWarning, match="explained grid skipped for simple_cnn: RuntimeError: Invalid activation"):
        evaluation = evaluate(EvaluateConfig(bootstrap=0), str(checkpoint), two_classes)

    assert mlflow.MlflowClient().get_run(evaluation.run_id).info.status == "FINISHED"
    assert "evaluation/explained.png" not in artifacts(evaluation.run_id)


def test_explain_takes_a_csv_of_paths_and_metadata_for_a_metadata_model(tmp_path: Path):
    from classifier.data.metadata import ColumnEncoding, to_plain

    checkpoint = torch.load(write_checkpoint(tmp_path / "model.pt"), weights_only=True)
    network = create_model("simple_cnn", 2, 3, metadata_width=2)  # age and its missing flag
    checkpoint.update(state_dict=network.state_dict(), metadata=to_plain([ColumnEncoding("age", "numeric", 50, 10)]))
    torch.save(checkpoint, tmp_path / "fused.pt")
    for number in range(2):
        class_image(number, 0).save(tmp_path / f"{number}.png")
    pd.DataFrame({"path": ["0.png", "1.png"], "age": ["30", ""]}).to_csv(tmp_path / "cases.csv", index=False)
    without = tmp_path / "plain.csv"
    pd.DataFrame({"path": ["0.png"]}).to_csv(without, index=False)

    model, out = str(tmp_path / "fused.pt"), tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", model, str(tmp_path / "cases.csv"), "-o", str(out)])
    refused = CliRunner().invoke(main, ["explain", model, str(without), "-o", str(tmp_path / "refused")])

    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "explanations.csv")
    assert table["error"].isna().all() and list(table["overlay"]) == ["0.png", "1.png"]
    classifier = load_classifier(str(tmp_path / "fused.pt"))
    expected = classifier.predict([str(tmp_path / "0.png")], metadata=pd.DataFrame({"age": ["30"]}))
    assert table["probability"][0] == pytest.approx(expected[f"prob_{table['explained_class'][0]}"][0], abs=1e-5)
    assert refused.exit_code == 1 and "pass CSVs with columns path,age" in refused.output
    assert not (tmp_path / "refused").exists()
