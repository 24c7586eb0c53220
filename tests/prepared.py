"""Tiny prepared datasets for the training tests, made by the real `prepare` from generated class folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_class_folders

from classifier.config import PrepareConfig
from classifier.data.prepare import TRACKING_VARIABLES, prepare


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
    with pytest.MonkeyPatch.context() as patch:
        for name in TRACKING_VARIABLES:  # preparing is not what these tests track
            patch.delenv(name, raising=False)
        prepare(images, root / "prepared", PrepareConfig(size=size, folds=folds, fractions=list(fractions)))
    return root / "prepared"
