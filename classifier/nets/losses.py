"""Training losses for imbalanced data: class-weighted cross-entropy with label smoothing, and focal loss; their
sigmoid (per-class binary) counterparts for multi-label data."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights n / (k * n_c), so a balanced dataset gets 1 for every class."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, optionally class-weighted.

    Targets are class indices or, for mixed images (mixup, cutmix), rows of class probabilities: p_true is then the
    probability the model gives the target's classes (their target-weighted sum), and each image weighs its target's
    weighted class weight."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        per_sample = F.cross_entropy(
            log_probs, targets, weight=self.weight, reduction="none", label_smoothing=self.label_smoothing
        )
        soft = targets.is_floating_point()
        p_true = (log_probs.exp() * targets).sum(1) if soft else log_probs.gather(1, targets[:, None]).squeeze(1).exp()
        focal = (1.0 - p_true).pow(self.gamma) * per_sample
        if self.weight is None:
            return focal.mean()
        return focal.sum() / (targets @ self.weight if soft else self.weight[targets]).sum()


class MultiLabelLoss(nn.Module):
    """Per-class binary cross-entropy (or torchvision's sigmoid focal loss) on multi-hot targets.

    `pos_weight` scales each class's positives, as BCE's `pos_weight` does (for focal loss each element's loss is
    scaled by 1 + (pos_weight - 1) x target); label smoothing pulls targets towards 0.5.
    """

    def __init__(
        self, focal_gamma: float | None = None, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.focal_gamma = focal_gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float() * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        if self.focal_gamma is not None:
            losses = sigmoid_focal_loss(logits.float(), targets, alpha=-1, gamma=self.focal_gamma, reduction="none")
            if self.pos_weight is not None:
                losses = losses * (1.0 + (self.pos_weight - 1.0) * targets)
            return losses.mean()
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)


def positive_weights(counts: np.ndarray, total: int) -> torch.Tensor:
    """Negatives over positives per class, so a rare label weighs as much as its absence."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.tensor((total - counts) / counts, dtype=torch.float32).clamp_min(1.0)


def make_criterion(
    loss: str,
    counts: np.ndarray,
    weighted: bool,
    label_smoothing: float,
    focal_gamma: float,
    multi_label_total: int | None = None,
) -> nn.Module:
    """The loss a TrainConfig asks for; `counts` are the training images per class. For multi-label data pass
    `multi_label_total` (the number of training images): the loss is then per-class binary."""
    if multi_label_total is not None:
        pos_weight = positive_weights(counts, multi_label_total) if weighted else None
        return MultiLabelLoss(focal_gamma if loss == "focal" else None, pos_weight, label_smoothing)
    weight = class_weights(counts) if weighted else None
    if loss == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
