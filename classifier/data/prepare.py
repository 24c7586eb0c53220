"""`classifier prepare`: source -> job list -> worker pool -> PNGs, manifest and dataset.json, renamed into place."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageStat
from tqdm import tqdm

from classifier import __version__
from classifier.config import PrepareConfig
from classifier.data.images import (
    CHANNELS_OF_MODE,
    image_bit_depth,
    image_channels,
    normalise_mode,
    open_channels,
    open_image,
    resize,
)
from classifier.data.layout import INFO_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, SPLITS, DatasetInfo, read_info
from classifier.data.sources import MAX_LISTED, Record, read_source
from classifier.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")  # set by the user or by `mlflow run`
# zlib level 1 with the run-length strategy: on filtered PNG rows of photos and tissue tiles about 40% faster than
# level 1's default strategy and as small as the default level 6 (which takes 2-5x longer).
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
CONVERTED = "converted"  # the staging sub-folder images are written to before their split is known


@dataclass
class Probe:
    """What a source image's header tells before any decoding; `sha256` of its content where it was read whole."""

    sha256: str
    channels: int = 0
    bit_depth: int = 8
    error: str | None = None


@dataclass
class Job:
    """Convert one record into `target` (relative to the dataset folder being written)."""

    record: Record
    target: str
    size: int
    resize: str
    channels: int
    bit_depth: int


@dataclass
class Converted:
    """A written image's content hash and per-channel sums of pixel values and of their squares (exact integers),
    or its error."""

    sha256: str = ""
    sums: list[int] | None = None
    squares: list[int] | None = None
    pixels: int = 0
    error: str | None = None


def prepare(source: Path, output: Path, config: PrepareConfig) -> DatasetInfo:
    """Prepare `source` into `output` (see classifier.data.layout); return what dataset.json records.

    A new or empty OUTPUT is written at once, each image hashed as it is converted. An OUTPUT holding a prepared
    dataset is first compared by hashing the sources: the same inputs and settings leave it as it is, others
    replace it with `overwrite` only.
    """
    source, output = Path(source), Path(output)
    found = read_source(
        source,
        config.path_column,
        config.label_column,
        config.group_column,
        config.class_names,
        config.multi_label,
        config.channel_files,
    )
    records = found.records
    with WorkerPool(config.workers or os.cpu_count() or 1) as pool, _exclusive(output):  # workers never hold the lock
        previous = _existing(output)
        hashing = previous is not None
        probe = functools.partial(probe_record, hashing=hashing)
        probes = list(_progress(pool.imap(probe, records), len(records), "hashing" if hashing else "reading"))
        if previous is not None and previous.fingerprint == _fingerprint(records, [p.sha256 for p in probes], config):
            print(f"{output}: already prepared from these inputs and settings", file=sys.stderr)
            info = previous
        elif previous is not None and not config.overwrite:
            raise UserError(
                f"{output}: prepared from other inputs or settings; "
                "pass --overwrite to replace it or choose another OUTPUT"
            )
        else:
            info = _write(output, records, probes, found.metadata_columns, config, pool)
        if any(os.environ.get(name) for name in TRACKING_VARIABLES):
            from classifier import tracking  # imports mlflow (seconds): only when there is a run to log to

            tracking.log_prepared_dataset(config.experiment, source, output, asdict(config), info)
    return info


def _write(
    output: Path,
    records: list[Record],
    probes: list[Probe],
    metadata_columns: list[str],
    config: PrepareConfig,
    pool: WorkerPool,
) -> DatasetInfo:
    """Convert the readable records into a staging folder while their splits are drawn, sort the PNGs into
    `<split>/<class>/`, write manifest.csv and dataset.json and rename the folder to `output`."""
    valid = [index for index, probe in enumerate(probes) if probe.error is None]
    if not valid:
        raise UserError("no readable images in the source; nothing to prepare")
    channels = config.channels or max(probes[index].channels for index in valid)
    sixteen_bit = channels == 1 and any(probes[index].bit_depth == 16 for index in valid)
    bit_depth = config.bit_depth or (16 if sixteen_bit else 8)
    kept = [records[index] for index in valid]
    jobs = [
        Job(record, f"{CONVERTED}/{index}.png", config.size, config.resize, channels, bit_depth)
        for index, record in zip(valid, kept, strict=True)
    ]
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    (staging / CONVERTED).mkdir(parents=True)
    try:
        converting = pool.imap(_Converter(staging), jobs)  # the workers start on the images now
        import pandas as pd  # meanwhile pandas, sklearn and scipy load here (a second or two)

        from classifier.data.splits import assign_splits

        splits, folds = assign_splits(
            [record.label for record in kept],
            config.split_fractions,
            config.seed,
            folds=config.folds,
            groups=[record.group for record in kept] if config.group_column else None,
            given=[record.split for record in kept],
            multi_label=config.multi_label,
        )
        targets = _target_paths(kept, splits, config.multi_label)
        converted = list(_progress(converting, len(jobs), "writing"))
        hashes = [probe.sha256 for probe in probes]  # the probe hashed the unreadable files, the converter the others
        bad = [(record.source, probe.error) for record, probe in zip(records, probes, strict=True) if probe.error]
        for index, result in zip(valid, converted, strict=True):
            hashes[index] = result.sha256
            if result.error:
                bad.append((records[index].source, result.error))
        skipped = _skip_or_fail(sorted(bad), config.skip_invalid)
        written = [row for row in zip(jobs, converted, targets, splits, folds, strict=True) if row[1].error is None]
        for job, _, target, _, _ in written:
            (staging / target).parent.mkdir(parents=True, exist_ok=True)
            (staging / job.target).rename(staging / target)
        (staging / CONVERTED).rmdir()
        manifest = pd.DataFrame(
            [
                [target, split, job.record.label, fold, job.record.group, job.record.source, result.sha256]
                + [job.record.metadata[column] for column in metadata_columns]
                for job, result, target, split, fold in written
            ],
            columns=[*MANIFEST_COLUMNS, *metadata_columns],
        ).sort_values("path")
        training = [result for _, result, _, split, _ in written if split == "training"]
        mean, std = _mean_std(training, channels, bit_depth)
        info = DatasetInfo(
            classes=sorted(set(manifest["label"].str.split().explode() if config.multi_label else manifest["label"])),
            size=config.size,
            channels=channels,
            bit_depth=bit_depth,
            mean=mean,
            std=std,
            seed=config.seed,
            fractions=config.split_fractions,
            folds=config.folds,
            resize=config.resize,
            counts=_counts(manifest, config.multi_label),
            task="multi_label" if config.multi_label else "single_label",
            fingerprint=_fingerprint(records, hashes, config),
            classifier_version=__version__,
            metadata_columns=metadata_columns,
            skipped=skipped,
        )
        manifest.to_csv(staging / MANIFEST_FILE, index=False, lineterminator="\n")
        (staging / INFO_FILE).write_text(info.to_json())
        _replace(staging, output)
    except BaseException:
        pool.stop()  # no worker may still be writing into the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def probe_record(record: Record, hashing: bool = True) -> Probe:
    """Read a record's header (mode, size); header-level problems become `error`. Hash its content when `hashing`,
    and always for a bad file (the converter hashes each good one as it reads it)."""
    if record.pixels is not None:
        pixels = record.pixels
        channels = 1 if pixels.ndim == 2 or pixels.shape[-1] == 1 else pixels.shape[-1]
        return Probe(_pixels_hash(pixels) if hashing else "", channels, 16 if pixels.dtype == np.uint16 else 8)
    if record.channel_paths is not None:
        return _probe_channels(record.channel_paths, hashing)
    try:
        with record.path.open("rb") as file:
            data = file.read() if hashing else b""
            probe = _read_header(io.BytesIO(data) if hashing else file)
            if probe.error and not hashing:
                file.seek(0)
                data = file.read()
    except OSError as error:
        return Probe("", error=f"cannot read ({error.strerror})")
    if hashing or probe.error:
        probe.sha256 = hashlib.sha256(data).hexdigest()
    return probe


def _probe_channels(paths: list[Path], hashing: bool) -> Probe:
    """Probe each channel file of one image: the first problem found is the image's; the hash covers every file."""
    digest = hashlib.sha256()
    for path in paths:
        probe = probe_record(Record(path.name, "", path=path), hashing)
        if probe.error:
            return Probe(probe.sha256, error=f"{path.name}: {probe.error}")
        digest.update(probe.sha256.encode())
    return Probe(digest.hexdigest() if hashing else "", len(paths), 8)


def _read_header(file: BinaryIO) -> Probe:
    """Parse the image header in `file` (Pillow reads no pixel data until asked)."""
    if not file.read(1):
        return Probe("", error="empty file (0 bytes)")
    file.seek(0)
    try:
        with Image.open(file) as image:
            pages = getattr(image, "n_frames", 1) if image.format == "TIFF" and image.mode == "L" else 1
            if image.mode not in CHANNELS_OF_MODE:
                return Probe("", error=f"unsupported image mode {image.mode}")
            return Probe("", pages if pages in (3, 4) else image_channels(image), image_bit_depth(image))
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad image, reported with its file
        return Probe("", error=f"not a readable image ({type(error).__name__})")


def _pixels_hash(pixels: np.ndarray) -> str:
    """The content hash of an array image (dtype and shape included)."""
    return hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode() + pixels.tobytes()).hexdigest()


class _Converter:
    """Picklable worker function: read and hash, decode, convert, resize and write one job's PNG under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, job: Job) -> Converted:
        record, digest = job.record, ""
        try:
            if record.pixels is not None:
                pixels = record.pixels
                digest = _pixels_hash(pixels)
                image = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
            else:
                paths = record.channel_paths or [record.path]
                try:
                    files = [path.read_bytes() for path in paths]  # read once: hashed, then decoded from memory
                except OSError as error:
                    return Converted(error=f"cannot read {error.filename} ({error.strerror})")
                hashes = [hashlib.sha256(data).hexdigest() for data in files]
                if record.channel_paths is None:
                    digest = hashes[0]
                    image = open_image(files[0], size=job.size, name=record.source)
                else:  # as `_probe_channels` hashes the files of one image
                    digest = hashlib.sha256("".join(hashes).encode()).hexdigest()
                    image = open_channels(files, size=job.size, names=[path.name for path in paths])
            image = resize(normalise_mode(image, job.channels, job.bit_depth), job.size, job.resize)
        except UserError as error:
            return Converted(digest, error=error.message.removeprefix(f"{record.source}: "))
        image.save(self.root / job.target, format="PNG", **PNG_OPTIONS)
        if job.bit_depth == 8:
            stat = ImageStat.Stat(image)
            return Converted(digest, [int(v) for v in stat.sum], [int(v) for v in stat.sum2], stat.count[0])
        pixels = np.asarray(image, dtype=np.int64).reshape(-1)
        return Converted(digest, [int(pixels.sum())], [int(np.dot(pixels, pixels))], len(pixels))


def _skip_or_fail(bad: list[tuple[str, str]], skip_invalid: bool) -> list[dict[str, str]]:
    """Fail listing every bad image (up to MAX_LISTED, then a count), or return them as `skipped` entries."""
    if bad and not skip_invalid:
        listed = "; ".join(f"{source}: {reason}" for source, reason in bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        noun = "image" if len(bad) == 1 else "images"
        raise UserError(f"{len(bad)} invalid {noun}: {listed}{more}; fix or remove them, or pass --skip-invalid")
    return [{"path": source, "reason": reason} for source, reason in bad]


def _target_paths(records: list[Record], splits: list[str], multi_label: bool = False) -> list[str]:
    """`<split>/<class>/<source name>.png` (multi-label: `<split>/images/...`), numbered on collisions (same name in
    two sub-folders)."""
    taken: set[str] = set()
    targets = []
    for record, split in zip(records, splits, strict=True):
        stem = Path(record.source).stem if record.path is not None else record.source.replace("[", "_").rstrip("]")
        folder = f"{split}/{'images' if multi_label else record.label}"
        target, number = f"{folder}/{stem}.png", 1
        while target in taken:
            number += 1
            target = f"{folder}/{stem}-{number}.png"
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


def _counts(manifest: pd.DataFrame, multi_label: bool = False) -> dict[str, dict[str, int]]:
    """Images per split and class (multi-label: images holding each class)."""
    if multi_label:
        manifest = manifest.assign(label=manifest["label"].str.split()).explode("label")
    counts = manifest.groupby(["split", "label"]).size()
    return {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS if split in counts}


def _fingerprint(records: list[Record], hashes: list[str], config: PrepareConfig) -> str:
    """sha256 over every record (name, label, group, given split, metadata, content hash) and the output settings."""
    settings = {
        key: value for key, value in asdict(config).items() if key not in ("workers", "overwrite", "experiment")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record, sha256 in zip(records, hashes, strict=True):
        entry = [record.source, record.label, record.group, record.split, record.metadata, sha256]
        digest.update(json.dumps(entry, sort_keys=True).encode())
    return digest.hexdigest()


def _existing(output: Path) -> DatasetInfo | None:
    """What `output` holds: a prepared dataset's info, or None for a new or empty folder; refuse anything else."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another OUTPUT")
    if (output / INFO_FILE).is_file():
        return read_info(output)
    if any(output.iterdir()):
        raise UserError(f"{output}: not empty and not a prepared dataset; choose a new or empty OUTPUT folder")
    return None


@contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `output` while preparing it: a second prepare into the same OUTPUT fails at once.

    The lock file is removed at the end (and so are the parent folders made for it, when no dataset was written).
    """
    made = [folder for folder in output.parents if not folder.exists()]  # deepest first
    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.parent / f".{output.name}.lock"
    descriptor = _lock(path, output)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: a prepare that opened it meanwhile sees it gone (see _lock)
        os.close(descriptor)
        for folder in [] if output.exists() else made:
            try:
                folder.rmdir()
            except OSError:  # not empty
                break


def _lock(path: Path, output: Path) -> int:
    """An open descriptor of `path` holding its exclusive flock, or a UserError when another prepare holds it."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(
                f"{path}: cannot create the lock file ({error.strerror}); check the permissions of OUTPUT's folder"
            ) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise UserError(
                f"{output}: another prepare is writing OUTPUT; wait for it or choose another OUTPUT"
            ) from None
        try:
            if os.path.samestat(os.stat(path), os.fstat(descriptor)):
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # locked a file the prepare before us had just removed: lock the new one


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
        # Workers die on terminate() even when the parent caught SIGTERM (`classifier train` turns it into Ctrl-C): a
        # forked worker would inherit that Python handler, which never runs while it blocks on the task queue.
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.Pool(
                workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)
            )

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End the workers at once (whatever they are doing); later calls do nothing."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def imap(self, function: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        if self.pool is None:
            return map(function, items)
        # short chunks keep every worker busy to the end on a few hundred large images; up to 8 for many small ones
        return self.pool.imap(function, items, chunksize=max(1, min(8, len(items) // (32 * self.workers))))


def _progress(results: Iterator[Any], total: int, what: str) -> Iterable[Any]:
    return tqdm(results, total=total, desc=what, unit="image", file=sys.stderr)
