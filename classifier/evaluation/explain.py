"""`classifier explain MODEL PATH...`: a Grad-CAM overlay (PNG) and raw map (.npy) per image, and a summary CSV."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from classifier.data.images import is_image_file
from classifier.errors import UserError
from classifier.model.gradcam import class_index, explain_images, png_bytes
from classifier.model.pyfunc import load_classifier

SUMMARY = "explanations.csv"
BATCH = 16  # images explained per backward pass


def image_paths(paths: Iterable[Path]) -> tuple[list[Path], pd.DataFrame]:
    """Image files as given, those under folders (recursively, by suffix or DICOM preamble), and those a CSV lists
    in its `path` column (relative to the CSV); with the CSV rows (other columns: metadata) or empty rows."""
    found: list[Path] = []
    rows: list[dict[str, str]] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(file for file in path.rglob("*") if file.is_file() and is_image_file(file))
            if not inside:
                raise UserError(f"{path}: no image files in this folder")
            found.extend(inside)
            rows.extend({} for _ in inside)
        elif path.suffix.lower() == ".csv":
            try:
                listed = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (OSError, ValueError) as error:
                raise UserError(f"{path}: unreadable CSV ({error}); give one with a `path` column") from error
            if "path" not in listed.columns:
                raise UserError(f"{path}: no `path` column; name the column holding the image paths `path`")
            listed = listed[listed["path"] != ""]
            found.extend(path.parent / value for value in listed["path"])
            rows.extend(listed.to_dict("records"))
        elif path.is_file():
            found.append(path)
            rows.append({})
        else:
            raise UserError(f"{path}: no such file or folder")
    return found, pd.DataFrame(rows, index=range(len(found)))


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _npy(heat: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, heat.astype(np.float32))
    return buffer.getvalue()


def explain(
    model: str,
    paths: Iterable[Path],
    output: Path,
    *,
    target_class: str | None = None,
    device: str | None = None,
    dicom_window: list[float] | None = None,
    dicom_frame: int | None = None,
) -> pd.DataFrame:
    """Explain each image under `paths` with `model` for `target_class` (default: the predicted class); write
    `<stem>.png` (overlay) and `<stem>.npy` (H x W map in [0, 1] at the model's input size) into `output`, and
    `explanations.csv` (path, label, explained class, its probability, files, error). An unreadable image gets its
    error in the CSV; the others are still explained. A model with metadata inputs takes CSVs of path and those
    columns."""
    images, listed = image_paths(paths)
    classifier = load_classifier(model, inference_device=device, dicom_window=dicom_window, dicom_frame=dicom_frame)
    if target_class is not None:
        class_index(classifier.classes, target_class)
    missing = [column for column in classifier.metadata_columns if column not in listed.columns]
    if missing:
        raise UserError(
            f"{model}: takes metadata ({', '.join(classifier.metadata_columns)}) beside each image; pass CSVs with "
            f"columns path,{','.join(classifier.metadata_columns)}"
        )
    encoded = classifier.encode_metadata(listed)
    output.mkdir(parents=True, exist_ok=True)
    rows, taken = [], set()
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        read = classifier.read(batch, [str(path) for path in batch])
        kept = [start + offset for offset, (tensor, _) in enumerate(read) if tensor is not None]
        tensors = [tensor for tensor, _ in read if tensor is not None]
        extra = None if encoded is None else encoded[kept]
        explained = iter(explain_images(classifier, tensors, target_class, extra) if tensors else [])
        for path, (tensor, error) in zip(batch, read, strict=True):
            if tensor is None:
                rows.append({"path": str(path), "error": error})
                continue
            explanation = next(explained)
            stem = _unique_stem(path.stem if path.suffix else path.name, taken)
            _write_atomically(output / f"{stem}.png", png_bytes(explanation.overlay))
            _write_atomically(output / f"{stem}.npy", _npy(explanation.heat))
            label = classifier.labels(explanation.probabilities[None])[0]
            rows.append(
                {
                    "path": str(path),
                    "label": label,
                    "explained_class": classifier.classes[explanation.target],
                    "probability": float(explanation.probabilities[explanation.target]),
                    "overlay": f"{stem}.png",
                    "heatmap": f"{stem}.npy",
                    "error": None,
                }
            )
    columns = ["path", "label", "explained_class", "probability", "overlay", "heatmap", "error"]
    table = pd.DataFrame(rows, columns=columns)
    partial = output / f".{SUMMARY}.partial"
    table.to_csv(partial, index=False)
    os.replace(partial, output / SUMMARY)
    bad = int(table["error"].notna().sum())
    note = f"; {bad} unreadable, see the error column of {SUMMARY}" if bad else ""
    print(f"explained {len(table) - bad} of {len(table)} images into {output}{note}", file=sys.stderr)
    return table


def _unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... when two images share a name."""
    candidate, number = stem, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}"
    taken.add(candidate)
    return candidate
