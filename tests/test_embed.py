"""`classifier embed`: penultimate-layer embeddings of a split, their t-SNE map and plot, logged in one run."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from PIL import Image
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import EmbedConfig, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.layout import read_manifest
from classifier.data.transforms import Normalise
from classifier.evaluation.embed import embed, embed_batch, stratified_sample
from classifier.learn.train import fit
from classifier.nets.models import create_model, model_from_checkpoint


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return prepared_dataset(tmp_path, {"benign": 12, "malignant": 12})


def test_embed_logs_every_image_of_the_split_with_its_tsne_point_and_plot(data: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out")
    trained = fit(config, data)

    result = CliRunner().invoke(main, ["embed", trained.run_id, str(data), "--split", "training", "--batch-size", "5"])

    assert result.exit_code == 0, result.output
    run_id = re.search(r"^run ([0-9a-f]{32}): embeddings/", result.output, re.MULTILINE)[1]
    client = mlflow.MlflowClient()
    assert {item.path for item in client.list_artifacts(run_id, "embeddings")} == {
        "embeddings/embeddings.npz",
        "embeddings/embeddings.csv",
        "embeddings/tsne.png",
    }
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="embeddings", dst_path=tmp_path))
    saved = np.load(folder / "embeddings.npz")
    manifest = read_manifest(data).query("split == 'training'")
    assert list(saved["classes"]) == ["benign", "malignant"]
    assert list(saved["paths"]) == manifest["path"].tolist()
    assert [saved["classes"][label] for label in saved["labels"]] == manifest["label"].tolist()
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    images = torch.from_numpy(load_split(data, "training").images)
    with torch.no_grad():
        normalise = Normalise(checkpoint["preprocessing"]["mean"], checkpoint["preprocessing"]["std"])
        expected = model_from_checkpoint(checkpoint).features(normalise(images))
    assert saved["embeddings"].shape == (len(manifest), 128)  # simple_cnn: 4 x 32 channels, pooled
    np.testing.assert_allclose(saved["embeddings"], expected.numpy(), rtol=1e-4, atol=1e-5)
    table = pd.read_csv(folder / "embeddings.csv")
    assert table["path"].tolist() == manifest["path"].tolist()
    assert table["label"].tolist() == manifest["label"].tolist()
    assert np.isfinite(table[["tsne_x", "tsne_y"]].to_numpy()).all()
    assert table[["tsne_x", "tsne_y"]].drop_duplicates().shape[0] == len(manifest)
    with Image.open(folder / "tsne.png") as plot:
        assert plot.width > 300
    run = client.get_run(run_id)
    assert run.data.metrics["images"] == len(manifest)
    assert float(run.data.params["tsne_perplexity"]) < len(manifest)  # 30 clipped to the 14 images


def test_embed_maps_a_stratified_sample_and_takes_timm_pre_logits(data: Path, tmp_path: Path) -> None:
    network = create_model("resnet10t", 2, 3)
    checkpoint = tmp_path / "resnet10t.pt"
    torch.save(
        {
            "architecture": "resnet10t",
            "num_classes": 2,
            "in_chans": 3,
            "state_dict": network.state_dict(),
            "classes": ["benign", "malignant"],
            "preprocessing": {"size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        },
        checkpoint,
    )

    result = embed(EmbedConfig(split="training", max_images=6, seed=3), str(checkpoint), data)

    training = load_split(data, "training")
    assert result.embeddings.shape == (len(training.labels), network.num_features)
    assert np.bincount(result.labels[result.rows]).tolist() == [3, 3]
    assert result.points.shape == (6, 2) and np.isfinite(result.points).all()


@pytest.mark.parametrize(
    ("name", "width"),
    [("simple_cnn", 128), ("resnet10t", 512), ("mobilenetv3_small_050", 1024)],  # mobilenetv3: its conv_head
)
def test_embed_batch_is_what_the_classifier_head_sees(name: str, width: int) -> None:
    model = create_model(name, 3, 3).eval()
    images = torch.randn(4, 3, 16, 16)

    with torch.no_grad():
        embeddings = embed_batch(model, images)

        assert embeddings.shape == (4, width)
        torch.testing.assert_close(model.get_classifier()(embeddings), model(images))


def test_stratified_sample_keeps_class_shares_and_is_seeded() -> None:
    labels = np.array([0] * 80 + [1] * 20)

    rows = stratified_sample(labels, 10, seed=0)

    assert np.bincount(labels[rows]).tolist() == [8, 2]
    assert np.array_equal(rows, stratified_sample(labels, 10, seed=0))
    assert not np.array_equal(rows, stratified_sample(labels, 10, seed=1))
    assert np.array_equal(stratified_sample(labels, 500, seed=0), np.arange(100))


def test_embed_refuses_a_model_of_other_classes_or_size_and_an_empty_split(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 5, "malignant": 5}, fractions=(0.6, 0.0, 0.4))
    other_classes = write_checkpoint(tmp_path / "cats.pt", classes=("cat", "dog"), size=16)
    other_size = write_checkpoint(tmp_path / "big.pt", size=32)
    fits = write_checkpoint(tmp_path / "fits.pt", size=16)
    runner = CliRunner()

    for model, split, message in [
        (other_classes, "test", "trained on classes ['cat', 'dog'], but"),
        (other_size, "test", "expects 32 px, 3 channel(s)"),
        (fits, "validation", "the validation split is empty"),
    ]:
        result = runner.invoke(main, ["embed", str(model), str(data), "--split", split])

        assert result.exit_code == 1
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: ") and message in last, result.output
    assert mlflow.search_runs(search_all_experiments=True).empty
