"""Training losses for imbalanced data: class-weighted cross-entropy with label smoothing, and focal loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights n / (k * n_c), so a balanced dataset gets 1 for every class."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, optionally class-weighted."""

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
        p_true = log_probs.gather(1, targets[:, None]).squeeze(1).exp()
        focal = (1.0 - p_true).pow(self.gamma) * per_sample
        if self.weight is None:
            return focal.mean()
        return focal.sum() / self.weight[targets].sum()


def make_criterion(
    loss: str, counts: np.ndarray, weighted: bool, label_smoothing: float, focal_gamma: float
) -> nn.Module:
    """The loss a TrainConfig asks for; `counts` are the training images per class."""
    weight = class_weights(counts) if weighted else None
    if loss == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
