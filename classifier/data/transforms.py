"""Image -> tensor conversion, normalisation and the augmentation recipes (torchvision.transforms.v2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


def image_to_tensor(image: Image.Image, bit_depth: int) -> torch.Tensor:
    """A prepared PIL image as a float CxHxW tensor in [0, 1] (8-bit divided by 255, 16-bit by 65535)."""
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    scale = 65535.0 if bit_depth == 16 else 255.0
    return torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1).contiguous()


class Normalise(torch.nn.Module):
    """(x - mean) / std with the training split's per-channel statistics (stored by prepare), as one multiply-add.

    uint8 batches (8-bit data) are scaled to [0, 1] in the same step; float batches are taken as already in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        scale = 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).clamp_min(1e-6)
        self.register_buffer("scale", scale)
        self.register_buffer("byte_scale", scale / 255.0)
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float().mul_(self.byte_scale).sub_(self.shift)
        return (images.float() * self.scale).sub_(self.shift)


def augmentation(recipe: str, size: int) -> v2.Compose | None:
    """Per-image training augmentation on CxHxW tensors: none, light (flip, small affine) or strong."""
    if recipe == "none":
        return None
    if recipe == "light":
        return v2.Compose(
            [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05))]
        )
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5),
            v2.ToDtype(torch.float32, scale=True),
            v2.GaussianNoise(sigma=0.03, clip=True),
            v2.RandomErasing(p=0.25, scale=(0.02, 0.15)),
        ]
    )


def flips(images: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation views of a NCHW batch: as is, flipped left-right and flipped upside down."""
    return [images, images.flip(-1), images.flip(-2)]
