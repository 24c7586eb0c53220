"""Tiny prepared datasets for the training tests, made by the real `prepare` from generated class folders."""

from __future__ import annotations

from pathlib import Path

from conftest import write_class_folders

from classifier.config import PrepareConfig, TrainConfig
from classifier.data.prepare import prepare


def prepared_dataset(
    root: Path,
    counts: dict[str, int],
    size: int = 16,
    folds: int | None = None,
    mode: str = "RGB",
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Path:
    """Write `counts[class]` generated images and prepare them at `size` px into `root/prepared`."""
    images = write_class_folders(root / "images", counts, size=(size, size), mode=mode)
    prepare(images, root / "prepared", PrepareConfig(size=size, folds=folds, fractions=list(fractions)))
    return root / "prepared"


def tiny_train_config(tmp_path: Path, **options) -> TrainConfig:
    """Three quick epochs on a tiny dataset, checkpoints in `tmp_path/outputs`; `options` override."""
    values = dict(epochs=3, batch_size=8, lr=3e-3, augment="none", system_metrics=False, num_workers=0)
    return TrainConfig(**{**values, "output_dir": tmp_path / "outputs", **options})
