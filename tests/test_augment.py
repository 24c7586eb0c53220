"""Batched augmentation (Kornia) and batches drawn from splits held on the training device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prepared import prepared_dataset, tiny_train_config
from torch.utils.data import DataLoader, RandomSampler

from classifier.data.batches import DeviceBatches, fits_on_device
from classifier.data.dataset import CachedImages, batched, load_split
from classifier.data.transforms import augmentation, recipe_flips, unit_range
from classifier.learn.train import make_loader


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("three"), {"red": 12, "green": 12, "blue": 12})


def quarter_bright(copies: int, channels: int = 1, size: int = 32) -> torch.Tensor:
    """`copies` identical images, bright in their top-left quarter only."""
    images = torch.zeros(copies, channels, size, size)
    images[:, :, : size // 2, : size // 2] = 1.0
    return images


@pytest.mark.parametrize("recipe", ["light", "xray", "strong"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_each_image_of_a_batch_gets_its_own_parameters_and_a_seed_repeats_them(recipe: str, channels: int) -> None:
    images = quarter_bright(16, channels)
    augment = augmentation(recipe)

    torch.manual_seed(3)
    first = augment(images.clone())
    torch.manual_seed(3)
    again = augment(images.clone())

    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    distinct = {tuple(image.flatten().round(decimals=3).tolist()) for image in first}
    assert len(distinct) == len(images)  # no two images of the batch were augmented alike


def test_the_xray_recipe_never_flips() -> None:
    torch.manual_seed(0)
    out = augmentation("xray")(quarter_bright(300))

    top, bottom = out[:, :, :16].mean((1, 2, 3)), out[:, :, 16:].mean((1, 2, 3))
    left, right = out[:, :, :, :16].mean((1, 2, 3)), out[:, :, :, 16:].mean((1, 2, 3))
    assert (top > bottom + 0.1).all() and (left > right + 0.1).all()
    assert recipe_flips("xray") == () and recipe_flips("light") == (-1,) and recipe_flips("strong") == (-1, -2)


def test_strong_crops_back_to_the_size_of_each_batch_it_gets() -> None:
    augment = augmentation("strong")

    assert augment(torch.rand(4, 3, 24, 24)).shape == (4, 3, 24, 24)  # a progressive-resizing stage
    assert augment(torch.rand(4, 3, 32, 32)).shape == (4, 3, 32, 32)
    assert augmentation("none") is None


def test_batches_drawn_on_the_device_cover_each_image_once_an_epoch_in_the_loaders_order(three_classes: Path) -> None:
    arrays = load_split(three_classes, "training")
    dataset = CachedImages(arrays, np.arange(1, len(arrays.labels), 2))  # a fold's rows: every other image
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(5))
    batches = DeviceBatches(dataset, 4, torch.device("cpu"), sampler)
    loaded = DataLoader(dataset, 4, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(5)))
    loaded.collate_fn = batched

    drawn = list(batches)
    assert len(drawn) == len(batches) == len(loaded)
    for (images, labels), (loader_images, loader_labels) in zip(drawn, loaded, strict=True):
        assert images.dtype == torch.uint8
        assert torch.equal(images, loader_images) and torch.equal(labels, loader_labels)
    seen = torch.cat([images for images, _ in drawn]).flatten(1)
    expected = torch.from_numpy(arrays.images[dataset.indices]).flatten(1)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))
    second_epoch = torch.cat([labels for _, labels in batches])
    assert sorted(second_epoch.tolist()) == sorted(dataset.labels.tolist())


def test_splits_go_to_the_cpu_device_when_in_memory_and_as_asked(
    three_classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLASSIFIER_CACHE_DIR", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    in_memory = load_split(three_classes, "training", cache="memory")
    mapped = load_split(three_classes, "training", cache="memmap")

    assert fits_on_device("auto", [in_memory], cpu) and not fits_on_device("auto", [in_memory, mapped], cpu)
    assert fits_on_device("true", [mapped], cpu) and not fits_on_device("false", [in_memory], cpu)
    config = tiny_train_config(tmp_path, num_workers=None)
    assert isinstance(make_loader(CachedImages(mapped), config, cpu, None, False, resident=False), DataLoader)
    assert isinstance(make_loader(CachedImages(mapped), config, cpu, None, False, resident=True), DeviceBatches)


def test_unit_range_scales_8_and_16_bit_batches() -> None:
    assert torch.equal(unit_range(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0]))
    assert torch.equal(unit_range(torch.tensor([0, 65535], dtype=torch.uint16)), torch.tensor([0.0, 1.0]))
