"""Grad-CAM explanations with pytorch-grad-cam: where in an image a network looked for a class.

The target layer is the network's last convolutional stage: timm's last `feature_info` stage, simple_cnn's last
conv block, the backbone of a metadata model (its metadata held fixed), each member of an ensemble (maps averaged).
No tracking: `classifier serve` and the explain command use it as training does.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from classifier.errors import UserError
from classifier.nets.ensemble import Ensemble
from classifier.nets.models import MetadataFusion, SimpleCNN

if TYPE_CHECKING:
    from classifier.model.pyfunc import ImageClassifier


def target_layers(network: nn.Module) -> list[nn.Module]:
    """The last convolutional stage(s) of `network`, whose activations Grad-CAM weighs."""
    if isinstance(network, Ensemble):
        return [layer for member in network.members for layer in target_layers(member)]
    if isinstance(network, MetadataFusion):
        return target_layers(network.backbone)
    if isinstance(network, SimpleCNN):
        return [[module for module in network.features if isinstance(module, nn.ReLU)][-1]]
    stages = getattr(network, "feature_info", None)
    if stages:
        last = stages[-1]
        return [network.get_submodule(last["module"] if isinstance(last, dict) else last.module)]
    convolutions = [module for module in network.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise UserError(f"{type(network).__name__}: no convolutional stage to explain with Grad-CAM")
    return [convolutions[-1]]


class _WithMetadata(nn.Module):
    """A metadata model as a function of its images alone, the metadata rows fixed (Grad-CAM passes one tensor)."""

    def __init__(self, network: nn.Module, metadata: torch.Tensor) -> None:
        super().__init__()
        self.network, self.metadata = network, metadata

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images, self.metadata)


def grad_cam(
    network: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int],
    metadata: torch.Tensor | None = None,
) -> np.ndarray:
    """Grad-CAM maps (N x H x W, each scaled to [0, 1], at the input size) of normalised `images` for the class
    indices `targets`; `metadata` the encoded rows of a metadata model."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = target_layers(network)
    model = network if metadata is None else _WithMetadata(network, metadata)
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    for parameter in trainable:  # no weight gradients: the backward pass runs from the target layers on only
        parameter.requires_grad_(False)
    hooks = [layer.register_forward_hook(_start_gradients) for layer in layers]  # before Grad-CAM's own hooks
    cam = GradCAM(model=model, target_layers=layers)
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(target)) for target in targets])
    except (ValueError, RuntimeError, IndexError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"Grad-CAM cannot explain this network ({type(error).__name__}: {reason})") from error
    finally:
        cam.activations_and_grads.release()
        for hook in hooks:
            hook.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    return np.nan_to_num(maps.astype(np.float32))


def _start_gradients(_module: nn.Module, _inputs: object, output: object) -> None:
    """Make a target layer's output the start of the graph that Grad-CAM differentiates."""
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)


def as_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C x H x W image in [0, 1] as H x W x 3 float32 (grey repeated; a fourth channel left out)."""
    pixels = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    pixels = pixels[:3] if pixels.shape[0] >= 3 else np.repeat(pixels[:1], 3, axis=0)
    return np.clip(pixels.transpose(1, 2, 0), 0.0, 1.0)


def overlay(image: torch.Tensor | np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The heat map (jet colours) blended over the image, as H x W x 3 uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(as_rgb(image), heat, use_rgb=True, image_weight=weight)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def explained_grid(path: Path, overlays: list[np.ndarray], titles: list[str], columns: int = 2) -> Path:
    """One PNG of overlays in rows of `columns`, each titled (true class, prediction, confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(overlays) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, pixels, title in zip(axes.flat, overlays, titles, strict=False):
        axis.imshow(pixels)
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@dataclass
class Explanation:
    """One image explained: the class explained (an index into the model's classes), every class's probability,
    the Grad-CAM map (H x W in [0, 1], the model's input size) and its overlay on the image (H x W x 3 uint8)."""

    target: int
    probabilities: np.ndarray
    heat: np.ndarray
    overlay: np.ndarray


def class_index(classes: list[str], name: str) -> int:
    """The index of class `name`, or a UserError listing the classes."""
    if name not in classes:
        raise UserError(f"--target-class {name}: not a class of this model; use one of {', '.join(classes)}")
    return classes.index(name)


def explain_images(
    classifier: ImageClassifier,
    tensors: list[torch.Tensor],
    target_class: str | None = None,
    metadata: np.ndarray | None = None,
    network: nn.Module | None = None,
) -> list[Explanation]:
    """Explain preprocessed images (`classifier.preprocess`) for `target_class`, else for each image's predicted
    class (multi-label models: its most probable class). Grad-CAM hooks `network` (default the classifier's own):
    a service passes a copy, so that predictions running meanwhile never pass through the hooks."""
    batch = torch.stack(tensors)
    probabilities = classifier.probabilities(batch, metadata)
    if target_class is not None:
        targets = [class_index(classifier.classes, target_class)] * len(tensors)
    elif classifier.multi_label:
        targets = probabilities.argmax(axis=1).tolist()
    else:
        targets = classifier.decide(probabilities).tolist()
    extra = None if metadata is None else torch.from_numpy(metadata).to(classifier.device)
    images = classifier.normalise(batch.to(classifier.device))
    heat = grad_cam(network or classifier.network, images, targets, extra)
    return [
        Explanation(target, row, maps, overlay(image, maps))
        for target, row, maps, image in zip(targets, probabilities, heat, tensors, strict=True)
    ]
