"""What only a CUDA GPU shows: augmentation and batches drawn on it, checkpoints that load on a CPU, one precision
for every way of scoring. Skipped (with the reason) without CUDA; `bench/device_check.sh` runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prepared import tiny_train_config
from torch.utils.data import RandomSampler

from classifier.data.batches import DeviceBatches, fits_on_device
from classifier.data.dataset import CachedImages, load_split
from classifier.data.transforms import augmentation
from classifier.learn.inference import predict_split
from classifier.learn.train import fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_batched_augmentation_runs_on_the_gpu_with_its_own_parameters_per_image() -> None:
    images = torch.zeros(64, 3, 64, 64, device=CUDA)
    images[:, :, :32, :32] = 1.0
    for recipe in ("light", "xray", "strong"):
        torch.manual_seed(0)
        out = augmentation(recipe)(images.clone())
        assert out.device.type == "cuda" and out.shape == images.shape
        assert len({tuple(image.flatten()[::97].round(decimals=3).tolist()) for image in out}) == len(images)


def test_a_split_held_on_the_gpu_is_drawn_there_and_covers_each_image_once_an_epoch(grey_pair: Path) -> None:
    arrays = load_split(grey_pair, "training")
    dataset = CachedImages(arrays)
    assert fits_on_device("auto", [arrays], CUDA)

    batches = DeviceBatches(dataset, 5, CUDA, RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    drawn = [(images, labels) for images, labels in batches]
    assert all(images.device.type == "cuda" and images.dtype == torch.uint8 for images, _ in drawn)
    labels = torch.cat([labels for _, labels in drawn]).cpu().numpy()
    assert sorted(labels.tolist()) == sorted(arrays.labels.tolist())


def test_a_gpu_run_writes_checkpoints_that_load_on_a_cpu_and_score_alike_there(grey_pair: Path, tmp_path: Path) -> None:
    result = fit(tiny_train_config(tmp_path, device="cuda", augment="light", keep_outputs=True), grey_pair)

    checkpoint = torch.load(result.checkpoint, weights_only=True)  # no map_location: CPU tensors or it fails here
    assert all(tensor.device.type == "cpu" for tensor in checkpoint["state_dict"].values())
    test = load_split(grey_pair, "test")
    _, on_gpu = predict_split(checkpoint, test, 8, CUDA)
    _, on_cpu = predict_split(checkpoint, test, 8, torch.device("cpu"))
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)  # one precision wherever it is scored
