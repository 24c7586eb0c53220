"""Image -> tensor conversion, normalisation and the augmentation recipes (torchvision.transforms.v2)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

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

    uint8 and uint16 batches (8- and 16-bit data) are scaled to [0, 1] in the same step; float batches are taken as
    already in [0, 1].
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        scale = 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).clamp_min(1e-6)
        self.register_buffer("scale", scale)
        self.register_buffer("byte_scale", scale / 255.0)
        self.register_buffer("word_scale", scale / 65535.0)
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype in (torch.uint8, torch.uint16):
            scale = self.byte_scale if images.dtype == torch.uint8 else self.word_scale
            return images.float().mul_(scale).sub_(self.shift)
        return (images.float() * self.scale).sub_(self.shift)


class RandomGamma(torch.nn.Module):
    """Gamma correction, the gamma drawn log-uniformly from `gammas` (torchvision has the correction, not the draw)."""

    def __init__(self, gammas: tuple[float, float] = (0.8, 1.25)) -> None:
        super().__init__()
        self.log_gammas = (math.log(gammas[0]), math.log(gammas[1]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = math.exp(torch.empty(()).uniform_(*self.log_gammas).item())
        return v2.functional.adjust_gamma(image, gamma)


def augmentation(recipe: str, size: int) -> v2.Compose | None:
    """Per-image training augmentation on CxHxW tensors: none, light (flip, small affine), strong, or xray (no flip,
    small affine, brightness, contrast and gamma; the image keeps its dtype, as with light)."""
    if recipe == "none":
        return None
    if recipe == "light":
        return v2.Compose(
            [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05))]
        )
    if recipe == "xray":  # no flips: anatomy and side markers have a left and a right, a top and a bottom
        return v2.Compose(
            [
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
                RandomGamma((0.8, 1.25)),
            ]
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


def flips(images: torch.Tensor, dims: Sequence[int] = (-1,)) -> list[torch.Tensor]:
    """Test-time augmentation views of a NCHW batch: as is, and flipped along each of `dims` (-1 left-right, -2
    upside down)."""
    return [images, *(images.flip(dim) for dim in dims)]


def recipe_flips(recipe: str) -> tuple[int, ...]:
    """The flips a training recipe makes (as `flips` dims): test-time augmentation shows a model only views it was
    trained on, so never an upside-down x-ray to a model that never saw one."""
    transform = augmentation(recipe, 8)
    steps = transform.transforms if transform is not None else []
    kinds = ((v2.RandomHorizontalFlip, -1), (v2.RandomVerticalFlip, -2))
    return tuple(dim for kind, dim in kinds if any(isinstance(step, kind) for step in steps))


def checkpoint_flips(checkpoint: dict) -> tuple[int, ...]:
    """The test-time flips of a checkpoint's model: those of its training recipe (an ensemble's: its first member's
    recipe is not stored, so left-right only, what every recipe but `none` does)."""
    return recipe_flips((checkpoint.get("config") or {}).get("augment", "light"))


def uses_tta(checkpoint: dict, setting: bool | None = None) -> bool:
    """Whether a checkpoint's model predicts with test-time augmentation: `setting`, else as it was trained (its
    `tta`, its threshold tuned on those probabilities)."""
    return bool(checkpoint.get("tta") if setting is None else setting)


def tta_views(checkpoint: dict) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The test-time views of a checkpoint's model: each batch as is and flipped as its recipe flips."""
    return functools.partial(flips, dims=checkpoint_flips(checkpoint))
