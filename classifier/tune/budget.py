"""Epochs per trial under a search's --budget: as many as the train config asks, unless too few trials would fit."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

from classifier.config import SearchConfig, TrainConfig
from classifier.learn.device import resolve_device
from classifier.learn.probe import epoch_seconds

MIN_FULL_TRIALS = 8  # whole-length trials the trials' share of a budget must hold (most trials are pruned early)
EPOCHS_ATTR = "budget_epochs"  # study user attr: the epochs the study's first launcher chose


def budget_epochs(study: optuna.Study, config: SearchConfig, train: TrainConfig, data: Path, seconds: float) -> int:
    """`train.epochs`, or fewer where fewer than MIN_FULL_TRIALS trials of that many epochs (and folds) would fit in
    `seconds` (the trials' share of the budget; GPU workers run side by side). An epoch is timed on a few batches
    here; the study's first launcher decides and the study keeps it, so every worker, on any machine, agrees."""
    if EPOCHS_ATTR in study.user_attrs:
        return int(study.user_attrs[EPOCHS_ATTR])
    folds = config.cv_folds or 1
    epoch = epoch_seconds(train, data)
    parallel = config.n_workers if resolve_device(train.device).type == "cuda" else 1
    fitting = int(seconds * parallel / (MIN_FULL_TRIALS * folds * epoch))
    fewest = max(2, train.freeze_epochs + 1, len(train.progressive_sizes or ()))
    epochs = min(train.epochs, max(fewest, fitting))
    study.set_user_attr(EPOCHS_ATTR, epochs)
    folded = f" x {folds} folds" if folds > 1 else ""
    print(
        f"search: an epoch takes about {epoch:.1f} s here{folded}; trials train up to {epochs} epochs "
        f"(train.epochs {train.epochs}), so that {MIN_FULL_TRIALS} whole trials fit the budget "
        "(--epochs N fixes them)",
        file=sys.stderr,
    )
    return epochs
