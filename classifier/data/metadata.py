"""Tabular metadata (age, sex, body site) as a float vector beside each image: standardised numbers, one-hot categories.

The encoding is fitted on the training split and stored in the checkpoint as plain values (no pickled sklearn object,
so checkpoints load with `weights_only=True` and the served model needs no pickle). A number that is missing or not a
number becomes 0 with a missing flag of 1; a category not seen in training (or missing) sets the `other` slot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from classifier.errors import UserError

MISSING = {"", "nan", "none", "null", "na", "n/a", "unknown", "?"}


@dataclass
class ColumnEncoding:
    """One metadata column: `numeric` (mean, std) or `categorical` (the categories seen in training)."""

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    categories: list[str] | None = None

    @property
    def width(self) -> int:
        """Numbers take a value and a missing flag; categories one slot each plus `other`."""
        return 2 if self.kind == "numeric" else len(self.categories or []) + 1


def fit_encoding(table: pd.DataFrame, columns: list[str]) -> list[ColumnEncoding]:
    """Encode each column as numeric when every present value parses as a number, else as categorical."""
    encodings = []
    for name in columns:
        values = _cells(table[name])
        present = [value for value in values if value.lower() not in MISSING]
        numbers = pd.to_numeric(pd.Series(present, dtype=object), errors="coerce")
        if present and numbers.notna().all():
            std = float(numbers.std(ddof=0)) if len(numbers) > 1 else 0.0
            encodings.append(ColumnEncoding(name, "numeric", float(numbers.mean()), std if std > 0 else 1.0))
        else:
            encodings.append(ColumnEncoding(name, "categorical", categories=sorted(set(present))))
    return encodings


def encode(table: pd.DataFrame, encodings: list[ColumnEncoding], where: str = "metadata") -> np.ndarray:
    """The N x width float32 matrix of `table`'s metadata columns; a missing column is an error naming it."""
    missing = [encoding.name for encoding in encodings if encoding.name not in table.columns]
    if missing:
        raise UserError(
            f"{where}: missing metadata columns {', '.join(missing)}; the model needs "
            f"{', '.join(encoding.name for encoding in encodings)} beside each image"
        )
    parts = []
    for encoding in encodings:
        values = _cells(table[encoding.name])
        if encoding.kind == "numeric":
            numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
            absent = np.isnan(numbers)
            standardised = np.where(absent, 0.0, (numbers - encoding.mean) / encoding.std)
            parts.append(np.stack([standardised, absent.astype(np.float64)], axis=1))
        else:
            categories = {category: index for index, category in enumerate(encoding.categories or [])}
            onehot = np.zeros((len(values), encoding.width))
            slots = [categories.get(value, len(categories)) for value in values]
            onehot[np.arange(len(values)), slots] = 1.0
            parts.append(onehot)
    if not parts:
        return np.zeros((len(table), 0), dtype=np.float32)
    return np.concatenate(parts, axis=1).astype(np.float32)


def encoding_width(encodings: list[ColumnEncoding]) -> int:
    return sum(encoding.width for encoding in encodings)


def to_plain(encodings: list[ColumnEncoding]) -> list[dict[str, Any]]:
    """Plain values for a checkpoint."""
    return [asdict(encoding) for encoding in encodings]


def from_plain(values: list[dict[str, Any]] | None) -> list[ColumnEncoding]:
    return [ColumnEncoding(**value) for value in values or []]


def _cells(column: pd.Series) -> list[str]:
    """Cells as stripped strings; NaN and None read as missing."""
    return ["" if pd.isna(value) else str(value).strip() for value in column.tolist()]
