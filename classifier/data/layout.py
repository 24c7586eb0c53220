"""The on-disk contract of a prepared dataset: `dataset.json`, `manifest.csv` and `<split>/<class>/*.png`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("training", "validation", "test")
INFO_FILE = "dataset.json"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("path", "split", "label", "fold", "group", "source", "sha256")


@dataclass
class DatasetInfo:
    """What `dataset.json` records about a prepared dataset."""

    classes: list[str]
    size: int
    channels: int
    bit_depth: int
    mean: list[float]
    std: list[float]
    seed: int
    fractions: dict[str, float]
    folds: int | None
    resize: str
    counts: dict[str, dict[str, int]]
    fingerprint: str
    classifier_version: str
    task: str = "single_label"
    metadata_columns: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def read_info(root: Path) -> DatasetInfo:
    """Read `root/dataset.json`, or explain that `root` is not a prepared dataset."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise UserError(
            f"{root}: not a prepared dataset (no {INFO_FILE}); run `classifier prepare SOURCE {root}` first"
        )
    try:
        values: dict[str, Any] = json.loads(path.read_text())
        return DatasetInfo(**values)
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(f"{path}: unreadable dataset description ({error}); prepare the dataset again") from error


def read_manifest(root: Path) -> pd.DataFrame:
    """Read `root/manifest.csv` with one row per prepared image (paths relative to `root`)."""
    import pandas as pd  # here, not at the top: prepare's workers start before pandas has loaded

    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{root}: not a prepared dataset (no {MANIFEST_FILE}); run `classifier prepare` first")
    manifest = pd.read_csv(path, dtype={"label": str, "group": str, "path": str}, keep_default_na=False)
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing)}; prepare the dataset again")
    return manifest
