"""Small real datasets that ship with a dependency, written as class folders (the README's demo data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from classifier.errors import UserError

DIGITS_MAX = 16  # load_digits pixels are counts 0..16


def write_digits(output: Path) -> int:
    """Write scikit-learn's digits as 8x8 grey PNGs in `output/<digit>/<index>.png`; return the image count."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: exists and is not an empty folder; choose a new OUTPUT")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX)).astype(np.uint8)
    staging = output.parent / f".{output.name}.partial"  # renamed into place when complete
    shutil.rmtree(staging, ignore_errors=True)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = staging / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return len(pixels)
