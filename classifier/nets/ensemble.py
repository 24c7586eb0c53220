"""An ensemble network: the mean of its members' probabilities, stored as one ordinary checkpoint.

The ensemble checkpoint has the keys of a training checkpoint, so the logged model, `predict`, `serve` and `evaluate`
read it unchanged: architecture "ensemble", the members' architectures in `config["members"]` and all their weights
in `state_dict` (`members.<i>.<name>`). The network's output is log(mean of the members' softmax), so its softmax is
exactly the averaged probabilities; for multi-label members it is logit(mean of their sigmoids), so its sigmoid is.
A member calibrated in training (`temperature` in `config["members"]`) is averaged with its calibrated probabilities.
Members taking metadata get it too (they must share its encoding). This module is imported by the served model:
torch only, no tracking.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from classifier.data.layout import positive_index
from classifier.data.metadata import encoding_width, from_plain
from classifier.errors import UserError
from classifier.nets.models import create_model, with_temperature

ENSEMBLE = "ensemble"


class Ensemble(nn.Module):
    """Members sharing classes and inputs; forward gives log(mean softmax), i.e. log-probabilities of the average,
    or (`multi_label`) the logits of the mean sigmoid probabilities."""

    def __init__(self, members: list[nn.Module], multi_label: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multi_label = multi_label

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            mean = torch.stack([member(*inputs).float().sigmoid() for member in self.members]).mean(dim=0)
            return torch.logit(mean, eps=1e-7)
        log_probabilities = torch.stack([member(*inputs).float().log_softmax(dim=1) for member in self.members])
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(self.members))


def ensemble_from_checkpoint(checkpoint: dict[str, Any]) -> Ensemble:
    """Rebuild the ensemble an ensemble checkpoint describes, in eval mode."""
    num_classes, in_chans = int(checkpoint["num_classes"]), int(checkpoint["in_chans"])
    described = checkpoint["config"]["members"]
    width = encoding_width(from_plain(checkpoint.get("metadata")))
    members = [
        create_model(member["architecture"], num_classes, in_chans, metadata_width=width) for member in described
    ]
    ensemble = Ensemble(members, multi_label=checkpoint.get("task") == "multi_label")
    ensemble.load_state_dict(checkpoint["state_dict"])
    for member, description in zip(members, described, strict=True):
        with_temperature(member, description.get("temperature"))
    return ensemble.eval()


def compatibility(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What members must share for their probabilities to be averaged and decided on: classes, task, positive
    class, metadata encoding and every preprocessing setting."""
    classes, task = list(checkpoint["classes"]), checkpoint.get("task", "single_label")
    positive = positive_index(classes, checkpoint.get("positive_class"), task)
    return {
        "classes": classes,
        "task": task,
        "positive_class": None if positive is None else classes[positive],
        "metadata": checkpoint.get("metadata") or [],
        **checkpoint["preprocessing"],
    }


def check_supported(checkpoint: dict[str, Any], source: str) -> None:
    """Refuse members this ensemble cannot average: ensembles themselves."""
    if checkpoint["architecture"] == ENSEMBLE:
        raise UserError(f"ensemble: {source} is itself an ensemble; pass the runs of its members instead")


def combine(checkpoints: list[dict[str, Any]], sources: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """One ensemble checkpoint from member checkpoints; `sources` (run ids, files or URIs) name them in errors and
    in the stored config, which `config` extends."""
    if len(checkpoints) < 2:
        raise UserError(f"ensemble: needs at least 2 members, got {len(checkpoints)}; pass more --runs or a study")
    reference = compatibility(checkpoints[0])
    for source, checkpoint in zip(sources, checkpoints, strict=True):
        check_supported(checkpoint, source)
        own = compatibility(checkpoint)
        for key in dict.fromkeys([*reference, *own]):
            if own.get(key) != reference.get(key):
                raise UserError(
                    f"ensemble: {sources[0]} and {source} differ in {key} ({reference.get(key)} vs {own.get(key)}); "
                    "ensemble models trained on the same prepared data"
                )
    members = [
        {
            "source": source,
            "architecture": str(checkpoint["architecture"]),
            "temperature": checkpoint.get("temperature"),
        }
        for source, checkpoint in zip(sources, checkpoints, strict=True)
    ]
    state_dict = {
        f"members.{index}.{key}": value
        for index, checkpoint in enumerate(checkpoints)
        for key, value in checkpoint["state_dict"].items()
    }
    return {
        "architecture": ENSEMBLE,
        "num_classes": int(checkpoints[0]["num_classes"]),
        "in_chans": int(checkpoints[0]["in_chans"]),
        "state_dict": state_dict,
        "classes": list(checkpoints[0]["classes"]),
        "preprocessing": dict(checkpoints[0]["preprocessing"]),
        "threshold": None,
        "positive_class": reference["positive_class"],
        "task": checkpoints[0].get("task", "single_label"),
        "metadata": checkpoints[0].get("metadata") or [],
        "config": {**config, "members": members},
    }
