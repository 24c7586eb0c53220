"""Read an image source (class folders, pre-split folders, a CSV of paths and labels, a MedMNIST .npz) into records.

A CSV may hold multi-label rows (space-separated class lists) and name each image by a stem whose channels are
separate files (`<stem>_red.png`, `<stem>_green.png`, ...), as the Human Protein Atlas does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classifier.data.images import IMAGE_SUFFIXES, is_image_file
from classifier.errors import UserError

SPLIT_ALIASES = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
SPLIT_ALIASES.update({"valid": "validation", "test": "test"})
NPZ_SPLITS = {"train": "training", "val": "validation", "test": "test"}
MAX_LISTED = 5


@dataclass
class Record:
    """One labelled image of the source: a file (`path`), one file per channel (`channel_paths`) or an array
    (`pixels`), named by `source` in the manifest. Multi-label records hold their classes space-separated, in class
    order (see `in_class_order`)."""

    source: str
    label: str
    path: Path | None = None
    pixels: np.ndarray | None = None
    group: str = ""
    split: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    channel_paths: list[Path] | None = None

    @property
    def classes(self) -> list[str]:
        return self.label.split()


@dataclass
class Source:
    """The records of a source, with the metadata columns (CSV sources) to carry into the manifest, and the class
    order the source fixes (the given `--class-names`, or an .npz's label numbers; None: alphabetical)."""

    records: list[Record]
    metadata_columns: list[str] = field(default_factory=list)
    class_order: list[str] | None = None


def read_source(
    source: Path,
    path_column: str = "path",
    label_column: str = "label",
    group_column: str | None = None,
    class_names: list[str] | None = None,
    multi_label: bool = False,
    channel_files: list[str] | None = None,
) -> Source:
    """Records of a folder of class folders, a folder of `training|validation|test/<class>/`, a CSV or an .npz.

    CSV: one row per image with `path_column` (relative to the CSV's folder) and `label_column`, optionally
    `group_column` and a `split` column; every other column is metadata kept in the manifest. With `multi_label` a
    label cell lists classes separated by spaces; with `channel_files` (e.g. red, green, blue, yellow) a path cell
    is a stem and its channels are the files `<stem>_<name>.<ext>`. `class_names`, when given, are the only classes
    allowed (a CSV label may also be an index into them). .npz: MedMNIST arrays `{train,val,test}_{images,labels}`
    (train required), labels named by `class_names` when given.
    """
    source = Path(source)
    is_csv = source.suffix.lower() == ".csv" and source.is_file()
    if (multi_label or channel_files) and not is_csv:
        option = "--multi-label" if multi_label else "--channel-files"
        raise UserError(f"{source}: {option} needs a CSV source (one row per image); pass a .csv")
    if source.is_dir():
        read = _read_split_folders if _split_folders(source) else _read_class_folders
        records = read(source)
    elif is_csv:
        return _read_csv(source, path_column, label_column, group_column, class_names, multi_label, channel_files)
    elif source.suffix.lower() == ".npz" and source.is_file():
        records = _read_npz(source, class_names)
        numbers = sorted({record.label for record in records}, key=int) if class_names is None else class_names
        _check_classes(source, records)
        return Source(records, class_order=numbers)
    elif not source.exists():
        raise UserError(f"{source}: no such file or folder; pass a folder of class folders, a .csv or a .npz")
    else:
        raise UserError(f"{source}: unsupported source; pass a folder of class folders, a .csv or a .npz")
    _check_classes(source, records)
    return Source(records)


def _split_folders(root: Path) -> list[Path]:
    return [folder for folder in _subfolders(root) if folder.name.lower() in SPLIT_ALIASES]


def _subfolders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = (path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    return sorted(path for path in files if is_image_file(path))


def _read_class_folders(root: Path, split: str | None = None, relative_to: Path | None = None) -> list[Record]:
    relative_to = relative_to or root
    loose = [path for path in root.iterdir() if path.is_file() and is_image_file(path)]
    if loose:
        raise UserError(f"{loose[0]}: image outside a class folder; move it into {root}/<class>/")
    records = []
    for folder in _subfolders(root):
        files = _image_files(folder)
        if not files:
            raise UserError(
                f"{folder}: class folder with no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it"
            )
        for path in files:
            records.append(Record(path.relative_to(relative_to).as_posix(), folder.name, path=path, split=split))
    if not records:
        raise UserError(f"{root}: no class folders; put images in {root}/<class>/ (one sub-folder per class)")
    return records


def _read_split_folders(root: Path) -> list[Record]:
    others = [folder.name for folder in _subfolders(root) if folder.name.lower() not in SPLIT_ALIASES]
    if others:
        raise UserError(f"{root}: mixes split folders with {others[0]}/; use only training/, validation/, test/")
    records = []
    for folder in _split_folders(root):
        records += _read_class_folders(folder, SPLIT_ALIASES[folder.name.lower()], relative_to=root)
    return records


def _read_csv(
    path: Path,
    path_column: str,
    label_column: str,
    group_column: str | None,
    class_names: list[str] | None = None,
    multi_label: bool = False,
    channel_files: list[str] | None = None,
) -> Source:
    import pandas as pd  # here, not at the top: prepare's workers start before pandas has loaded

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable CSV ({str(error).splitlines()[0]}); fix the file") from error
    for option, column in (("--path-column", path_column), ("--label-column", label_column)):
        if column not in table.columns:
            raise UserError(f"{path}: no column '{column}' ({option}); columns are {', '.join(table.columns)}")
    if group_column is not None and group_column not in table.columns:
        raise UserError(
            f"{path}: no group column '{group_column}' (--group-column); columns are {', '.join(table.columns)}"
        )
    split_column = "split" if "split" in table.columns else None
    metadata_columns = [c for c in table.columns if c not in {path_column, label_column, group_column, split_column}]
    records, missing, unlabelled, bad_splits, unknown = [], [], [], [], []
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        channels = None
        if channel_files:
            files = channel_paths(path.parent, row[path_column], channel_files)
            absent = [name for name, file in zip(channel_files, files, strict=True) if file is None]
            if absent:
                missing.append(f"row {row_number}: {row[path_column] or '(empty path)'}_{{{','.join(absent)}}}")
                continue
            channels = [file for file in files if file is not None]
            image = channels[0]
        else:
            image = resolve_image(path.parent, row[path_column])
        if image is None:
            missing.append(f"row {row_number}: {row[path_column] or '(empty path)'}")
            continue
        if not row[label_column].strip():
            unlabelled.append(f"row {row_number}")
            continue
        names = row[label_column].split() if multi_label else [row[label_column].strip()]
        named = [_named_class(name, class_names) for name in names]
        if None in named:
            unknown.append(f"row {row_number}: '{row[label_column]}'")
            continue
        split = SPLIT_ALIASES.get(row[split_column].strip().lower()) if split_column else None
        if split_column and split is None:
            bad_splits.append(f"row {row_number}: '{row[split_column]}'")
        records.append(
            Record(
                row[path_column],
                " ".join(in_class_order(set(named), class_names)),
                path=image,
                group=row[group_column] if group_column else "",
                split=split,
                metadata={column: row[column] for column in metadata_columns},
                channel_paths=channels,
            )
        )
    if missing:
        what = "missing channel files" if channel_files else "missing image files"
        raise UserError(f"{path}: {_listing(missing)} point at {what}; fix the paths (relative to the CSV)")
    if unknown:
        raise UserError(
            f"{path}: {_listing(unknown)} name classes not in --class-names ({', '.join(class_names or [])}); "
            "fix the labels or the class names"
        )
    if unlabelled:
        raise UserError(f"{path}: {_listing(unlabelled)} have an empty '{label_column}'; label or remove them")
    if bad_splits:
        raise UserError(f"{path}: {_listing(bad_splits)} have an unknown split; use training, validation or test")
    if not records:
        raise UserError(f"{path}: no rows; list one image per row with columns {path_column},{label_column}")
    _check_classes(path, records, multi_label)
    return Source(records, metadata_columns, class_names)


def in_class_order(names: set[str] | list[str], class_order: list[str] | None) -> list[str]:
    """`names` in the order of `class_order` (the given class names), or alphabetical without one."""
    if class_order is None:
        return sorted(names)
    position = {name: index for index, name in enumerate(class_order)}
    return sorted(names, key=position.__getitem__)


def _named_class(name: str, class_names: list[str] | None) -> str | None:
    """`name` itself without `class_names`; else `name` if it is one, the class it indexes if a number, or None."""
    if class_names is None or name in class_names:
        return name
    if name.isdigit() and int(name) < len(class_names):
        return class_names[int(name)]
    return None


def channel_paths(folder: Path, stem: str, names: list[str]) -> list[Path | None]:
    """For each channel name, the file `<stem>_<name>.<image suffix>` under `folder`, or None where there is none."""
    return [resolve_image(folder, f"{stem.strip()}_{name}") if stem.strip() else None for name in names]


def resolve_image(folder: Path, value: str) -> Path | None:
    """The image file a CSV cell names (relative to the CSV's folder; an image suffix may be left out)."""
    if not value.strip():
        return None
    path = folder / value.strip()
    candidates = [path] + ([path.with_name(path.name + suffix) for suffix in IMAGE_SUFFIXES] if not path.suffix else [])
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _read_npz(path: Path, class_names: list[str] | None) -> list[Record]:
    try:
        arrays = np.load(path)
        keys = set(arrays.files)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable .npz ({error}); pass a MedMNIST-style file") from error
    prefixes = [prefix for prefix in NPZ_SPLITS if f"{prefix}_images" in keys or f"{prefix}_labels" in keys]
    if "train" not in prefixes:
        raise UserError(f"{path}: missing keys train_images/train_labels (has {', '.join(sorted(keys))})")
    records = []
    for prefix in prefixes:
        for key in (f"{prefix}_images", f"{prefix}_labels"):
            if key not in keys:
                raise UserError(f"{path}: has {prefix}_* arrays but no '{key}'; add it or drop the other")
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise UserError(
                f"{path}: {prefix}_images has {len(images)} images but {prefix}_labels {len(labels)} labels"
            )
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
            raise UserError(f"{path}: {prefix}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3|4)")
        if images.dtype != np.uint8 and not (images.dtype == np.uint16 and images.ndim == 3):
            raise UserError(f"{path}: {prefix}_images are {images.dtype}; expected uint8 (or uint16 grey) pixels")
        if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
            raise UserError(f"{path}: {prefix}_labels has shape {labels.shape}; multi-label .npz is not supported yet")
        for index, (pixels, label) in enumerate(zip(images, labels.reshape(-1), strict=True)):
            name = _class_name(path, int(label), class_names)
            records.append(Record(f"{prefix}_images[{index}]", name, pixels=pixels, split=NPZ_SPLITS[prefix]))
    return records


def _class_name(path: Path, label: int, class_names: list[str] | None) -> str:
    if class_names is None:
        return str(label)
    if not 0 <= label < len(class_names):
        raise UserError(f"{path}: label {label} has no name in --class-names ({len(class_names)} given)")
    return class_names[label]


def _check_classes(source: Path, records: list[Record], multi_label: bool = False) -> None:
    classes = sorted({name for record in records for name in (record.classes if multi_label else [record.label])})
    if len(classes) < 2:
        raise UserError(f"{source}: only one class ({classes[0]}); a classifier needs at least two")
    given = {record.split for record in records} - {None}
    if given and "training" not in given:
        raise UserError(f"{source}: has {', '.join(sorted(given))} splits but no training split")


def _listing(items: list[str]) -> str:
    """'a, b, c' for a few items, 'a, b, c, d, e (and 7 more)' past MAX_LISTED."""
    shown = ", ".join(items[:MAX_LISTED])
    return f"{len(items)} rows ({shown}{f' and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED else ''})"
