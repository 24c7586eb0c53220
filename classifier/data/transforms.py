"""Image -> tensor conversion, normalisation, the batched augmentation recipes (Kornia) and test-time views."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image


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


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """A uint8 or uint16 batch as floats in [0, 1] (float batches are taken as already there)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.dtype == torch.uint16:
        return images.float().div_(65535.0)
    return images.float()


class BatchAugmentation(torch.nn.Module):
    """A training recipe applied to whole NCHW float batches in [0, 1] on whichever device holds them, each image
    with its own random parameters (Kornia), drawn from torch's global generator (seeded, and saved in `last.pt`)."""

    def __init__(self, recipe: str) -> None:
        super().__init__()
        self.recipe = recipe
        self.by_size = torch.nn.ModuleDict()  # `strong` crops back to the batch's size: one pipeline per size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = str(images.shape[-1])
        if size not in self.by_size:
            self.by_size[size] = recipe_steps(self.recipe, images.shape[-1]).to(images.device)
        return self.by_size[size](images)


def recipe_steps(recipe: str, size: int) -> torch.nn.Sequential:
    """The steps of a recipe for `size` px batches: none, light (flip, small affine), xray (no flip: small affine,
    brightness, contrast and gamma) or strong (crop, both flips, affine with shear, noise, erasing)."""
    if recipe == "none":
        return torch.nn.Sequential()
    if recipe == "light":
        return torch.nn.Sequential(
            K.RandomHorizontalFlip(), K.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05), p=1.0)
        )
    if recipe == "xray":  # no flips: anatomy and side markers have a left and a right, a top and a bottom
        return torch.nn.Sequential(
            K.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, p=1.0),
            K.RandomGamma(gamma=(0.8, 1.25), p=1.0),
        )
    return torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.7, 1.0)),
        K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(),
        K.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5.0, p=1.0),
        K.RandomGaussianNoise(std=0.03, p=1.0),
        ClampUnit(),
        K.RandomErasing(p=0.25, scale=(0.02, 0.15)),
    )


class ClampUnit(torch.nn.Module):
    """Clip a batch back to [0, 1] (after added noise)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp_(0.0, 1.0)


def augmentation(recipe: str) -> BatchAugmentation | None:
    """The batched training augmentation of a recipe; None for `none`."""
    return None if recipe == "none" else BatchAugmentation(recipe)


def flips(images: torch.Tensor, dims: Sequence[int] = (-1,)) -> list[torch.Tensor]:
    """Test-time augmentation views of a NCHW batch: as is, and flipped along each of `dims` (-1 left-right, -2
    upside down)."""
    return [images, *(images.flip(dim) for dim in dims)]


def recipe_flips(recipe: str) -> tuple[int, ...]:
    """The flips a training recipe makes (as `flips` dims): test-time augmentation shows a model only views it was
    trained on, so never an upside-down x-ray to a model that never saw one."""
    steps = recipe_steps(recipe, 8)
    kinds = ((K.RandomHorizontalFlip, -1), (K.RandomVerticalFlip, -2))
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
