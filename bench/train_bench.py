"""Training throughput of `fit`'s loop against a bare PyTorch loop over the same tensors already on the device.

Both train the same model with the same batch size on the same decoded images; the bare loop never augments, `fit`
augments with `--augment`, so the ratio shows what the input pipeline, augmentation, AMP/channels_last plumbing and
progress bars cost. Target: >= 0.9x with augmentation on. The input pipeline alone (batches drawn, augmented and
normalised on the device, no model) is timed beside them: on a GPU it must deliver >= 2x the bare loop's rate.

    python bench/train_bench.py [PREPARED_DATASET] [--size 64] [--model simple_cnn] [--augment light]
        [--batch-size 128] [--epochs 1] [--data-on-device auto]

Without a dataset it prepares PneumoniaMNIST (../shared/data) at `--size` px, or generated images when that is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier.config import PrepareConfig, TrainConfig
from classifier.data.batches import fits_on_device
from classifier.data.dataset import CachedImages
from classifier.data.layout import read_info
from classifier.data.prepare import prepare
from classifier.learn.device import resolve_device
from classifier.learn.train import Trainer, _datasets, make_loader
from classifier.nets.models import create_model

WARM_UP_BATCHES = 5
NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_trainval.npz"


def prepared_dataset(scratch: Path, size: int = 28) -> Path:
    output = scratch / "prepared"
    if NPZ.is_file():
        prepare(NPZ, output, PrepareConfig(size=size))
        return output
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_class_folders

    write_class_folders(scratch / "images", {"a": 1500, "b": 1500}, size=(size, size))
    prepare(scratch / "images", output, PrepareConfig(size=size))
    return output


def loaders(config: TrainConfig, data: Path, device: torch.device) -> tuple[CachedImages, Any, Any]:
    """The training set, its loader as `fit` makes it, and a short loader for warming up."""
    info = read_info(data)
    train_set, _, _ = _datasets(config, data, info, None)
    resident = fits_on_device(config.data_on_device, [train_set.arrays], device)
    loader = make_loader(train_set, config, device, torch.Generator().manual_seed(config.seed), True, resident)
    warm_up = CachedImages(train_set.arrays, train_set.indices[: WARM_UP_BATCHES * config.batch_size])
    return train_set, loader, make_loader(warm_up, config, device, torch.Generator(), True, resident)


def input_images_per_second(config: TrainConfig, data: Path, epochs: int) -> float:
    """Images/s the input pipeline alone delivers: batches drawn, augmented and normalised on the device."""
    info = read_info(data)
    device = resolve_device(config.device)
    trainer = Trainer(config, info, create_model(config.model, len(info.classes), info.channels), device)
    train_set, loader, warm_up = loaders(config, data, device)
    for inputs, _ in warm_up:
        trainer._inputs(inputs, augment=True)
    start = time.perf_counter()
    for _ in range(epochs):
        for inputs, labels in loader:
            trainer._inputs(inputs, augment=True)
            labels.to(device, non_blocking=True)
    _synchronise(device)
    return epochs * len(train_set) / (time.perf_counter() - start)


def pipeline_images_per_second(config: TrainConfig, data: Path, epochs: int) -> float:
    """Images/s of `Trainer.train_one_epoch` over `make_loader`: the code `fit` runs each epoch."""
    info = read_info(data)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    trainer = Trainer(config, info, create_model(config.model, len(info.classes), info.channels), device)
    train_set, loader, warm_up = loaders(config, data, device)
    trainer.set_criterion(np.bincount(train_set.labels, minlength=len(info.classes)), len(train_set))
    trainer.train_one_epoch(warm_up)
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.train_one_epoch(loader)
    _synchronise(device)
    return epochs * len(train_set) / (time.perf_counter() - start)


def bare_images_per_second(config: TrainConfig, data: Path, epochs: int) -> float:
    """The same model, batch size and decoded uint8 tensors, in the plainest PyTorch loop."""
    info = read_info(data)
    device = resolve_device(config.device)
    train_set, _, _ = _datasets(config, data, info, None)
    images = torch.from_numpy(train_set.arrays.images[train_set.indices]).to(device)
    labels = torch.from_numpy(train_set.labels).to(device)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    torch.manual_seed(config.seed)
    model = create_model(config.model, len(info.classes), info.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()

    def one_epoch(limit: int | None = None) -> None:
        model.train()
        for batch in torch.randperm(len(labels), device=device).split(config.batch_size)[:limit]:
            inputs = (images[batch].float() / 255 - mean) / std
            loss = criterion(model(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    one_epoch(WARM_UP_BATCHES)
    start = time.perf_counter()
    for _ in range(epochs):
        one_epoch()
    _synchronise(device)
    return epochs * len(labels) / (time.perf_counter() - start)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path)
    parser.add_argument("--size", type=int, default=64, help="Image size to prepare at (without a dataset).")
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--augment", default="light", help="fit's recipe (the bare loop never augments).")
    parser.add_argument("--data-on-device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the two loops this many times.")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        augment=args.augment,
        device=args.device,
        data_on_device=args.data_on_device,
    )
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or prepared_dataset(Path(scratch), args.size)
        bare, pipeline, inputs = [], [], []
        for _ in range(args.rounds):
            bare.append(bare_images_per_second(config, data, args.epochs))
            pipeline.append(pipeline_images_per_second(config, data, args.epochs))
            inputs.append(input_images_per_second(config, data, args.epochs))
        size = read_info(data).size
    print(
        f"model {args.model}, {size} px, augment {args.augment}, batch {args.batch_size}, "
        f"device {resolve_device(args.device)}, data on device {args.data_on_device}, {args.epochs} epochs"
    )
    print(f"bare PyTorch loop:    {max(bare):8.0f} images/s (best of {args.rounds})")
    print(f"classifier fit:       {max(pipeline):8.0f} images/s, {max(pipeline) / max(bare):.2f}x (target >= 0.9)")
    print(f"input pipeline alone: {max(inputs):8.0f} images/s, {max(inputs) / max(bare):.2f}x (GPU target >= 2)")


if __name__ == "__main__":
    main()
