"""Seeded, stratified (and grouped) training/validation/test splits and k-fold assignment, using sklearn splitters;
multi-label data are stratified per label by iterative stratification (iterstrat)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.preprocessing import MultiLabelBinarizer

from classifier.errors import UserError


def assign_splits(
    labels: Sequence[str],
    fractions: dict[str, float],
    seed: int,
    folds: int | None = None,
    groups: Sequence[str] | None = None,
    given: Sequence[str | None] | None = None,
    multi_label: bool = False,
) -> tuple[list[str], list[int]]:
    """Split and fold per record: splits the input already has are kept; missing ones are carved out of training.

    The test split is `fractions["test"]` of all records; without `folds` the validation split is
    `fractions["validation"]` of all records; with `folds` every non-test record is in training with a fold 0..K-1.
    With `groups` every group lands in one split and one fold (sizes are then approximate). With `multi_label`, each
    label is a space-separated class list and every class is stratified (iterative stratification).
    """
    if multi_label:
        if groups is not None:
            raise UserError("--group-column: grouped splits of multi-label data are not supported; drop the column")
        binarizer = MultiLabelBinarizer()
        labels = binarizer.fit_transform([label.split() for label in labels])
        class_names = binarizer.classes_
    else:
        labels = np.asarray(labels, dtype=object)
        class_names = None
    if groups is not None:  # a record without a group is a group of its own
        groups = np.asarray([group or f"\0{index}" for index, group in enumerate(groups)], dtype=object)
    split = np.array([value or "training" for value in (given or [None] * len(labels))], dtype=object)
    present = set(split) if given is not None and any(given) else {"training"}
    carve = [name for name in ("test", "validation") if fractions[name] > 0 and name not in present]
    if folds is not None and "validation" in carve:
        carve.remove("validation")
    for name in carve:
        pool = np.flatnonzero(split == "training")
        count = round(fractions[name] * len(labels))
        split[_take(pool, count, labels, groups, seed, name)] = name
    fold = np.full(len(labels), -1)
    if folds is not None:
        split[split == "validation"] = "training"
        pool = np.flatnonzero(split == "training")
        fold[pool] = _folds(pool, folds, labels, groups, seed, class_names)
    return split.tolist(), fold.tolist()


def _take(
    pool: np.ndarray, count: int, labels: np.ndarray, groups: np.ndarray | None, seed: int, name: str
) -> np.ndarray:
    """`count` records of `pool`, stratified by label (whole groups when grouped), for split `name`."""
    if count == 0:
        return pool[:0]
    try:
        if labels.ndim == 2:
            splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count, random_state=seed)
            _, taken = next(splitter.split(pool, labels[pool]))
            return pool[taken]
        if groups is None:
            _, taken = train_test_split(pool, test_size=count, stratify=labels[pool], random_state=seed)
            return taken
        splitter = StratifiedGroupKFold(n_splits=max(2, round(len(pool) / count)), shuffle=True, random_state=seed)
        _, taken = next(splitter.split(pool, labels[pool], groups[pool]))
        return pool[taken]
    except ValueError as error:
        raise UserError(
            f"--fractions: cannot carve a stratified {name} split of {count} from {len(pool)} images "
            f"({error}); use more images per class or other fractions"
        ) from error


def _folds(
    pool: np.ndarray,
    folds: int,
    labels: np.ndarray,
    groups: np.ndarray | None,
    seed: int,
    class_names: np.ndarray | None = None,
) -> np.ndarray:
    """Fold 0..K-1 for each record of `pool`, stratified by label (whole groups per fold when grouped); multi-hot
    `labels` are stratified per class (`class_names` name their columns)."""
    if folds < 2:
        raise UserError(f"--folds {folds}: k-fold needs at least 2 folds")
    if labels.ndim == 2:
        names, counts = class_names, labels[pool].sum(axis=0)
    else:
        names, counts = np.unique(labels[pool], return_counts=True)
    if folds > counts.min():
        smallest = names[counts.argmin()]
        raise UserError(
            f"--folds {folds}: more folds than the {counts.min()} training images of class '{smallest}'; "
            f"use at most {counts.min()}"
        )
    if groups is not None and folds > len(set(groups[pool])):
        raise UserError(f"--folds {folds}: more folds than the {len(set(groups[pool]))} groups; use fewer folds")
    if labels.ndim == 2:
        parts = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, labels[pool])
    elif groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(pool, labels[pool])
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(pool, labels[pool], groups[pool])
    fold = np.empty(len(pool), dtype=int)
    for index, (_, held_out) in enumerate(parts):
        fold[held_out] = index
    return fold
