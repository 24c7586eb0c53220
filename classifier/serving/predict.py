"""`classifier predict`: label image files, folders or CSV lists of paths with a trained model, into a CSV."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from classifier.data.images import IMAGE_SUFFIXES, is_image_file
from classifier.data.sources import channel_paths
from classifier.errors import UserError
from classifier.model.pyfunc import ERROR_COLUMN, load_classifier

PATH_COLUMN = "path"
STDOUT = Path("-")


def list_images(paths: Iterable[Path]) -> list[Path]:
    """Expand the PATH arguments: a file is taken as is, a folder is searched recursively for image files, a CSV
    supplies its `path` column (relative paths resolve against the CSV's folder, as in a prepared manifest.csv)."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(file for file in path.rglob("*") if file.is_file() and is_image_file(file))
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images.extend(found)
        elif path.suffix.lower() == ".csv":
            images.extend(_paths_in_csv(path))
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return images


def _paths_in_csv(csv: Path) -> list[Path]:
    return [csv.parent / value for value in _read_csv(csv)[PATH_COLUMN]]


def _read_csv(csv: Path) -> pd.DataFrame:
    """The rows of a CSV listing images in its `path` column (rows with an empty path left out)."""
    try:
        listed = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{csv}: unreadable CSV ({error}); give one with a `{PATH_COLUMN}` column") from error
    if PATH_COLUMN not in listed.columns:
        raise UserError(f"{csv}: no `{PATH_COLUMN}` column; name the column holding the image paths `{PATH_COLUMN}`")
    return listed[listed[PATH_COLUMN] != ""].reset_index(drop=True)


def list_channel_images(paths: Iterable[Path], channel_files: list[str]) -> tuple[list[str], list[list[Path]]]:
    """The stems that CSVs list in their `path` column, and each stem's channel files `<stem>_<name>.<ext>` (a
    missing one keeps a `.png` name, so that its row reports it)."""
    stems, images = [], []
    for path in paths:
        if path.suffix.lower() != ".csv" or not path.is_file():
            raise UserError(f"{path}: --channel-files reads image stems from a CSV's `{PATH_COLUMN}` column; pass one")
        for stem in _read_csv(path)[PATH_COLUMN]:
            files = channel_paths(path.parent, stem, channel_files)
            fallback = [path.parent / f"{stem}_{name}.png" for name in channel_files]
            stems.append(str(path.parent / stem))
            images.append([file or missing for file, missing in zip(files, fallback, strict=True)])
    return stems, images


def metadata_rows(paths: Iterable[Path], columns: list[str]) -> pd.DataFrame:
    """The metadata of the images a model with metadata inputs is asked about: PATHS must be CSVs with those columns."""
    tables = []
    for path in paths:
        if path.suffix.lower() != ".csv" or not path.is_file():
            raise UserError(
                f"{path}: this model also takes metadata ({', '.join(columns)}); pass a CSV with columns "
                f"{PATH_COLUMN},{','.join(columns)}"
            )
        table = _read_csv(path)
        missing = [column for column in columns if column not in table.columns]
        if missing:
            raise UserError(f"{path}: missing metadata columns {', '.join(missing)}; the model needs them per image")
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def write_csv(table: pd.DataFrame, output: Path) -> None:
    """Write `table` to `output` all at once (a temporary file renamed into place), or to stdout for "-"."""
    if output == STDOUT:
        table.to_csv(sys.stdout, index=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=output.parent, suffix=".partial", delete=False, newline="") as file:
        table.to_csv(file, index=False)
    os.replace(file.name, output)


def predict(
    model: str,
    paths: Iterable[Path],
    output: Path,
    *,
    batch_size: int | None = None,
    tta: bool | None = None,
    device: str | None = None,
    workers: int | None = None,
    dicom_window: list[float] | None = None,
    dicom_frame: int | None = None,
    channel_files: list[str] | None = None,
) -> pd.DataFrame:
    """Predict every image under `paths` with `model` and write path, label, confidence, the decision's threshold(s)
    and rule (see `ImageClassifier.decision`), prob_<class>, error rows.

    With `channel_files` (e.g. red, green, blue, yellow), `paths` are CSVs of image stems whose channels are files.
    """
    paths = list(paths)
    if channel_files:
        names, images = list_channel_images(paths, channel_files)
    else:
        images = list_images(paths)
        names = [str(image) for image in images]
    classifier = load_classifier(
        model,
        tta=tta,
        inference_batch_size=batch_size,
        inference_device=device,
        decode_workers=workers,
        dicom_window=dicom_window,
        dicom_frame=dicom_frame,
    )
    metadata = metadata_rows(paths, classifier.metadata_columns) if classifier.metadata_columns else None
    table = classifier.predict(images, progress=True, metadata=metadata)
    table.insert(0, PATH_COLUMN, names)
    for position, (column, value) in enumerate(classifier.decision.items(), start=3):  # after path, label, confidence
        table.insert(position, column, value)
    write_csv(table, output)
    unreadable = int(table[ERROR_COLUMN].notna().sum())
    where = "stdout" if output == STDOUT else output
    note = f"; {unreadable} unreadable, see the {ERROR_COLUMN} column" if unreadable else ""
    print(f"predicted {len(table) - unreadable} of {len(table)} images into {where}{note}", file=sys.stderr)
    return table
