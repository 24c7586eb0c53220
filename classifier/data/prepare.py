"""`classifier prepare`: source -> job list -> worker pool -> PNGs, manifest and dataset.json, renamed into place."""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageStat
from tqdm import tqdm

from classifier import __version__
from classifier.config import PrepareConfig
from classifier.data.images import CHANNELS_OF_MODE, image_bit_depth, image_channels, normalise_mode, open_image, resize
from classifier.data.layout import INFO_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, SPLITS, DatasetInfo, read_info
from classifier.data.sources import MAX_LISTED, Record, read_source
from classifier.errors import UserError

TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")  # set by the user or by `mlflow run`
PNG_COMPRESSION = 1  # zlib level 1: about half the time of the default 6 for PNGs ~10% larger


@dataclass
class Probe:
    """What reading a source image's bytes and header tells before any decoding."""

    sha256: str
    channels: int = 0
    bit_depth: int = 8
    error: str | None = None


@dataclass
class Job:
    """Convert one record into `target` (relative to the dataset folder being written)."""

    record: Record
    target: str
    split: str
    fold: int
    sha256: str
    size: int
    resize: str
    channels: int
    bit_depth: int


@dataclass
class Converted:
    """A written image's per-channel sums of pixel values and of their squares (exact integers), or its error."""

    sums: list[int] | None = None
    squares: list[int] | None = None
    pixels: int = 0
    error: str | None = None


def prepare(source: Path, output: Path, config: PrepareConfig) -> DatasetInfo:
    """Prepare `source` into `output` (see classifier.data.layout); return what dataset.json records."""
    source, output = Path(source), Path(output)
    found = read_source(source, config.path_column, config.label_column, config.group_column, config.class_names)
    records = found.records
    workers = config.workers or os.cpu_count() or 1
    with WorkerPool(workers) as pool:
        reading = _progress(pool, probe_record, records, "reading")  # the workers start on the files now
        import classifier.data.splits  # noqa: F401 - meanwhile sklearn and scipy load here (about a second)

        probes = list(reading)
        fingerprint = _fingerprint(records, probes, config)
        if _up_to_date(output, fingerprint, config.overwrite):
            print(f"{output}: already prepared from these inputs and settings", file=sys.stderr)
            info = read_info(output)
        else:
            info = _write(output, records, probes, fingerprint, found.metadata_columns, config, pool)
    if any(os.environ.get(name) for name in TRACKING_VARIABLES):
        from classifier import tracking  # imports mlflow (seconds): only when there is a run to log to

        tracking.log_prepared_dataset(config.experiment, source, output, asdict(config), info)
    return info


def _write(
    output: Path,
    records: list[Record],
    probes: list[Probe],
    fingerprint: str,
    metadata_columns: list[str],
    config: PrepareConfig,
    pool: WorkerPool,
) -> DatasetInfo:
    from classifier.data.splits import assign_splits  # loaded while the workers read (see prepare)

    unreadable = [(record.source, probe.error) for record, probe in zip(records, probes, strict=True) if probe.error]
    valid = [(record, probe) for record, probe in zip(records, probes, strict=True) if probe.error is None]
    if not valid:
        raise UserError("no readable images in the source; nothing to prepare")
    channels = config.channels or max(probe.channels for _, probe in valid)
    sixteen_bit = channels == 1 and any(probe.bit_depth == 16 for _, probe in valid)
    bit_depth = config.bit_depth or (16 if sixteen_bit else 8)
    splits, folds = assign_splits(
        [record.label for record, _ in valid],
        config.split_fractions,
        config.seed,
        folds=config.folds,
        groups=[record.group for record, _ in valid] if config.group_column else None,
        given=[record.split for record, _ in valid],
    )
    targets = _target_paths([record for record, _ in valid], splits)
    jobs = [
        Job(record, target, split, fold, probe.sha256, config.size, config.resize, channels, bit_depth)
        for (record, probe), target, split, fold in zip(valid, targets, splits, folds, strict=True)
    ]
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        converted = list(_progress(pool, _Converter(staging), jobs, "writing"))
        undecodable = [
            (job.record.source, result.error) for job, result in zip(jobs, converted, strict=True) if result.error
        ]
        skipped = _skip_or_fail(sorted(unreadable + undecodable), config.skip_invalid)
        written = [(job, result) for job, result in zip(jobs, converted, strict=True) if result.error is None]
        manifest = pd.DataFrame(
            [
                [job.target, job.split, job.record.label, job.fold, job.record.group, job.record.source, job.sha256]
                + [job.record.metadata[column] for column in metadata_columns]
                for job, _ in written
            ],
            columns=[*MANIFEST_COLUMNS, *metadata_columns],
        ).sort_values("path")
        mean, std = _mean_std([result for job, result in written if job.split == "training"], channels, bit_depth)
        info = DatasetInfo(
            classes=sorted(set(manifest["label"])),
            size=config.size,
            channels=channels,
            bit_depth=bit_depth,
            mean=mean,
            std=std,
            seed=config.seed,
            fractions=config.split_fractions,
            folds=config.folds,
            resize=config.resize,
            counts=_counts(manifest),
            fingerprint=fingerprint,
            classifier_version=__version__,
            metadata_columns=metadata_columns,
            skipped=skipped,
        )
        manifest.to_csv(staging / MANIFEST_FILE, index=False, lineterminator="\n")
        (staging / INFO_FILE).write_text(info.to_json())
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def probe_record(record: Record) -> Probe:
    """Hash a record's bytes and read its header (mode, size); header-level problems become `error`."""
    if record.pixels is not None:
        pixels = record.pixels
        digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
        channels = 1 if pixels.ndim == 2 or pixels.shape[-1] == 1 else pixels.shape[-1]
        return Probe(digest, channels, 16 if pixels.dtype == np.uint16 else 8)
    try:
        data = record.path.read_bytes()
    except OSError as error:
        return Probe("", error=f"cannot read ({error.strerror})")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Probe(digest, error="empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pages = getattr(image, "n_frames", 1) if image.format == "TIFF" and image.mode == "L" else 1
            if image.mode not in CHANNELS_OF_MODE:
                return Probe(digest, error=f"unsupported image mode {image.mode}")
            return Probe(digest, pages if pages in (3, 4) else image_channels(image), image_bit_depth(image))
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad image, reported with its file
        return Probe(digest, error=f"not a readable image ({type(error).__name__})")


class _Converter:
    """Picklable worker function: decode, convert, resize and write one job's PNG under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, job: Job) -> Converted:
        record = job.record
        try:
            if record.pixels is not None:
                pixels = record.pixels
                image = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
            else:
                image = open_image(record.path, size=job.size, name=record.source)
            image = resize(normalise_mode(image, job.channels, job.bit_depth), job.size, job.resize)
        except UserError as error:
            return Converted(error=error.message.removeprefix(f"{record.source}: "))
        target = self.root / job.target
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="PNG", compress_level=PNG_COMPRESSION)
        if job.bit_depth == 8:
            stat = ImageStat.Stat(image)
            return Converted([int(v) for v in stat.sum], [int(v) for v in stat.sum2], stat.count[0])
        pixels = np.asarray(image, dtype=np.int64).reshape(-1)
        return Converted([int(pixels.sum())], [int(np.dot(pixels, pixels))], len(pixels))


def _skip_or_fail(bad: list[tuple[str, str]], skip_invalid: bool) -> list[dict[str, str]]:
    """Fail listing every bad image (up to MAX_LISTED, then a count), or return them as `skipped` entries."""
    if bad and not skip_invalid:
        listed = "; ".join(f"{source}: {reason}" for source, reason in bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        noun = "image" if len(bad) == 1 else "images"
        raise UserError(f"{len(bad)} invalid {noun}: {listed}{more}; fix or remove them, or pass --skip-invalid")
    return [{"path": source, "reason": reason} for source, reason in bad]


def _target_paths(records: list[Record], splits: list[str]) -> list[str]:
    """`<split>/<class>/<source name>.png`, numbered on collisions (same name in two sub-folders)."""
    taken: set[str] = set()
    targets = []
    for record, split in zip(records, splits, strict=True):
        stem = Path(record.source).stem if record.path is not None else record.source.replace("[", "_").rstrip("]")
        target, number = f"{split}/{record.label}/{stem}.png", 1
        while target in taken:
            number += 1
            target = f"{split}/{record.label}/{stem}-{number}.png"
        taken.add(target)
        targets.append(target)
    return targets


def _mean_std(results: list[Converted], channels: int, bit_depth: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of pixel values scaled to [0, 1] (exact integer sums first)."""
    count, top = sum(result.pixels for result in results), 2**bit_depth - 1
    if count == 0:
        return [0.0] * channels, [1.0] * channels
    sums = [sum(values) / count / top for values in zip(*(result.sums for result in results), strict=True)]
    squares = [sum(values) / count / top**2 for values in zip(*(result.squares for result in results), strict=True)]
    std = [math.sqrt(max(square - mean**2, 0.0)) for mean, square in zip(sums, squares, strict=True)]
    return [round(value, 6) for value in sums], [round(value, 6) for value in std]


def _counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = manifest.groupby(["split", "label"]).size()
    return {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS if split in counts}


def _fingerprint(records: list[Record], probes: list[Probe], config: PrepareConfig) -> str:
    """sha256 over every record (name, label, group, given split, metadata, content hash) and the output settings."""
    settings = {
        key: value for key, value in asdict(config).items() if key not in ("workers", "overwrite", "experiment")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record, probe in zip(records, probes, strict=True):
        entry = [record.source, record.label, record.group, record.split, record.metadata, probe.sha256]
        digest.update(json.dumps(entry, sort_keys=True).encode())
    return digest.hexdigest()


def _up_to_date(output: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when `output` holds this very dataset; refuse a folder prepared otherwise unless `overwrite`."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another OUTPUT")
    if not (output / INFO_FILE).is_file():
        if any(output.iterdir()):
            raise UserError(f"{output}: not empty and not a prepared dataset; choose a new or empty OUTPUT folder")
        return False
    if read_info(output).fingerprint == fingerprint:
        return True
    if not overwrite:
        raise UserError(
            f"{output}: prepared from other inputs or settings; pass --overwrite to replace it or choose another OUTPUT"
        )
    return False


def _replace(staging: Path, output: Path) -> None:
    """Move the finished `staging` folder to `output` (renames only, so a dataset is never half there)."""
    if output.exists():
        previous = output.parent / f".{output.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        output.rename(previous)
        staging.rename(output)
        shutil.rmtree(previous)
    else:
        staging.rename(output)


class WorkerPool:
    """A multiprocessing pool of `workers` processes, or plain in-process calls for one worker."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.Pool(workers) if workers > 1 else None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def imap(self, function: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        if self.pool is None:
            return map(function, items)
        return self.pool.imap(function, items, chunksize=max(1, min(8, len(items) // (8 * self.workers))))


def _progress(pool: WorkerPool, function: Callable[[Any], Any], items: list[Any], what: str) -> Iterable[Any]:
    return tqdm(pool.imap(function, items), total=len(items), desc=what, unit="image", file=sys.stderr)
