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
# Class names that mean "no disease": of two classes, the other one is the positive class (compared lower-case, with
# spaces and dashes read as underscores).
NEGATIVE_NAMES = ("normal", "healthy", "benign", "negative", "no_finding")


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
    dicom: dict[str, Any] = field(default_factory=dict)  # how DICOM sources were read: window, frame (DicomSettings)
    positive_class: str | None = None  # two single-label classes: the one thresholds, recall and AUC are about

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def positive_index(self) -> int | None:
        return positive_index(self.classes, self.positive_class, self.task)


def positive_index(classes: list[str], positive_class: str | None, task: str | None = "single_label") -> int | None:
    """The index of the positive class of a two-class single-label task (`positive_class`, or the second class where
    none is recorded, as datasets and models made before it was recorded had it); None for any other task."""
    if len(classes) != 2 or task == "multi_label":
        return None
    return list(classes).index(positive_class) if positive_class is not None else 1


def choose_positive_class(classes: list[str], given: str | None, task: str = "single_label") -> tuple[str | None, str]:
    """The positive class of a dataset and why: `given`, else, of two classes, the one not named like a negative
    class (NEGATIVE_NAMES), else the second; no positive class for more classes or multi-label data. A reason that
    starts with "chose" is a guess the user should hear about."""
    if len(classes) != 2 or task == "multi_label":
        if given is not None:
            raise UserError(
                f"--positive-class {given}: only two-class single-label data have a positive class; this has "
                f"{len(classes)} classes{' (multi-label)' if task == 'multi_label' else ''}; drop the option"
            )
        return None, ""
    if given is not None:
        if given not in classes:
            raise UserError(f"--positive-class {given}: not a class of this dataset; use one of {', '.join(classes)}")
        return given, "given"
    negative = [name for name in classes if name.lower().replace(" ", "_").replace("-", "_") in NEGATIVE_NAMES]
    if len(negative) == 1:
        positive = next(name for name in classes if name != negative[0])
        return positive, f"the other class is named {negative[0]!r}"
    other = classes[0]
    return classes[1], (
        f"chose {classes[1]!r}, the second class (no single class is named like a negative one: "
        f"{', '.join(NEGATIVE_NAMES)}); pass --positive-class {other} to make {other!r} the positive class"
    )


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


def images_per_split(manifest: pd.DataFrame) -> dict[str, int]:
    """Images in each split present, in SPLITS order: manifest rows, not class counts (a multi-label image holding
    three classes is one image)."""
    sizes = manifest["split"].value_counts()
    return {split: int(sizes[split]) for split in SPLITS if split in sizes}
