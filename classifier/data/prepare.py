"""`classifier prepare`: source -> job list -> worker pool -> PNGs, manifest and dataset.json, renamed into place."""

from __future__ import annotations

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
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageStat

from classifier import __version__, processes
from classifier.config import PrepareConfig
from classifier.console import progress
from classifier.data.dicom import (
    DicomSettings,
    check_keyword,
    group_salt,
    group_value,
    hashed_group,
    is_dicom,
    probe_dicom,
)
from classifier.data.images import (
    CHANNELS_OF_MODE,
    image_bit_depth,
    image_channels,
    normalise_mode,
    open_channels,
    open_image,
    resize,
)
from classifier.data.layout import (
    INFO_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    SPLITS,
    DatasetInfo,
    choose_positive_class,
    read_info,
)
from classifier.data.sources import MAX_LISTED, Record, read_source
from classifier.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

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
    dicom: DicomSettings | None = None


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
    _check_apart(source, output)
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
    if config.group_tag:
        records = _group_by_tag(records, config.group_tag, config.keep_tags)
    with WorkerPool(config.workers or os.cpu_count() or 1) as pool, _exclusive(output):  # workers never hold the lock
        previous = _existing(output)
        hashing = previous is not None
        probe = functools.partial(probe_record, hashing=hashing)
        probes = list(_progress(pool.imap(probe, records), len(records), "hashing" if hashing else "reading"))
        if previous is not None and previous.fingerprint == _fingerprint(records, [p.sha256 for p in probes], config):
            print(f"{output}: already prepared from these inputs and settings", file=sys.stderr)
            info = _with_positive_class(output, previous, config.positive_class)
        elif previous is not None and not config.overwrite:
            raise UserError(
                f"{output}: prepared from other inputs or settings; "
                "pass --overwrite to replace it or choose another OUTPUT"
            )
        else:
            info = _write(output, records, probes, found.metadata_columns, config, pool, found.class_order)
    return info


def _write(
    output: Path,
    records: list[Record],
    probes: list[Probe],
    metadata_columns: list[str],
    config: PrepareConfig,
    pool: WorkerPool,
    class_order: list[str] | None = None,
) -> DatasetInfo:
    """Convert the readable records into a staging folder while their splits are drawn, sort the PNGs into
    `<split>/<class>/`, write manifest.csv and dataset.json and rename the folder to `output`.

    The dataset's classes (the index of each model output) keep `class_order` when the source fixes one (given
    class names), else are sorted; a split or fold left without a class is reported on stderr."""
    valid = [index for index, probe in enumerate(probes) if probe.error is None]
    if not valid:
        raise UserError("no readable images in the source; nothing to prepare")
    channels = config.channels or max(probes[index].channels for index in valid)
    sixteen_bit = channels == 1 and any(probes[index].bit_depth == 16 for index in valid)
    bit_depth = config.bit_depth or (16 if sixteen_bit else 8)
    kept = [records[index] for index in valid]
    dicom = DicomSettings(tuple(config.window) if config.window else None, config.frame)  # type: ignore[arg-type]
    jobs = [
        Job(record, f"{CONVERTED}/{index}.png", config.size, config.resize, channels, bit_depth, dicom)
        for index, record in zip(valid, kept, strict=True)
    ]
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    (staging / CONVERTED).mkdir(parents=True)
    try:
        converting = pool.imap(_Converter(staging), jobs)  # the workers start on the images now
        started = time.time()
        import pandas as pd  # meanwhile pandas, sklearn and scipy load here (a second or two)

        from classifier.data.splits import assign_splits

        splits, folds = assign_splits(
            [record.label for record in kept],
            config.split_fractions,
            config.seed,
            folds=config.folds,
            groups=[record.group for record in kept] if config.group_column or config.group_tag else None,
            given=[record.split for record in kept],
            multi_label=config.multi_label,
        )
        targets = _target_paths(kept, splits, config.multi_label)
        converted = list(_progress(converting, len(jobs), "writing", started))
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
        present = set(manifest["label"].str.split().explode() if config.multi_label else manifest["label"])
        classes = [name for name in class_order or sorted(present) if name in present]
        unused = [name for name in class_order or [] if name not in present]
        notes = [f"warning: no images of {', '.join(unused)}; left out of the dataset's classes"] if unused else []
        notes += missing_classes(manifest, classes, config.multi_label)
        task = "multi_label" if config.multi_label else "single_label"
        positive, reason = choose_positive_class(classes, config.positive_class, task)
        if reason.startswith("chose"):
            notes.append(f"prepare: positive class {reason}")
        info = DatasetInfo(
            classes=classes,
            size=config.size,
            channels=channels,
            bit_depth=bit_depth,
            mean=mean,
            std=std,
            seed=config.seed,
            fractions=_fractions(config),
            folds=config.folds,
            resize=config.resize,
            counts=_counts(manifest, config.multi_label),
            task=task,
            positive_class=positive,
            fingerprint=_fingerprint(records, hashes, config),
            classifier_version=__version__,
            metadata_columns=metadata_columns,
            skipped=skipped,
            dicom=dicom.to_plain() if config.window or config.frame is not None else {},
        )
        manifest.to_csv(staging / MANIFEST_FILE, index=False, lineterminator="\n")
        (staging / INFO_FILE).write_text(info.to_json())
        _replace(staging, output)
    except BaseException:
        pool.stop()  # no worker may still be writing into the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for note in notes:
        print(note, file=sys.stderr)
    return info


def missing_classes(manifest: pd.DataFrame, classes: list[str], multi_label: bool = False) -> list[str]:
    """A warning line for each split, and each cross-validation fold, that has images but none of some classes
    (multi-label: no image holding them): their metrics there are left out, not scored."""
    held = manifest["label"].str.split() if multi_label else manifest["label"].map(lambda label: [label])
    parts = [(f"the {split} split", manifest["split"] == split) for split in SPLITS]
    parts += [(f"fold {fold}", manifest["fold"] == fold) for fold in sorted(set(manifest["fold"]) - {-1})]
    notes = []
    for where, rows in parts:
        if rows.any():
            there = set(held[rows].explode())
            missing = [name for name in classes if name not in there]
            if missing:
                noun = "class" if len(missing) == 1 else "classes"
                notes.append(
                    f"warning: {where} has no images of {noun} {', '.join(missing)}; "
                    f"metrics there leave {'it' if len(missing) == 1 else 'them'} out"
                )
    return notes


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
            probe = _read_header(io.BytesIO(data) if hashing else file, record.source)
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


def _read_header(file: BinaryIO, name: str = "") -> Probe:
    """Parse the image header in `file` (Pillow reads no pixel data until asked; pydicom none for DICOM files)."""
    head = file.read(132)
    if not head:
        return Probe("", error="empty file (0 bytes)")
    file.seek(0)
    if is_dicom(head, name):
        try:
            return Probe("", *probe_dicom(file, name))
        except UserError as error:
            return Probe("", error=error.message.removeprefix(f"{name}: "))
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
                    image = open_image(files[0], size=job.size, name=record.source, dicom=job.dicom)
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


def _group_by_tag(records: list[Record], tag: str, keep: bool) -> list[Record]:
    """Each record's group from DICOM `tag` (e.g. PatientID): a salted hash of it, or the value itself with `keep`.
    Files without the tag, and non-DICOM files, are listed in one error."""
    check_keyword(tag)
    salt = None if keep else group_salt()
    grouped, bad = [], []
    for record in records:
        if record.path is None or record.channel_paths is not None:
            raise UserError(f"--group-tag {tag}: needs DICOM files; {record.source} is not one file")
        try:
            value = group_value(record.path, tag)
        except UserError as error:
            bad.append(error.message)
            continue
        grouped.append(replace(record, group=value if salt is None else hashed_group(value, salt)))
    if bad:
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        listed = "; ".join(bad[:MAX_LISTED])
        raise UserError(f"--group-tag {tag}: {len(bad)} of {len(records)} files lack it: {listed}{more}")
    return grouped


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


def _fractions(config: PrepareConfig) -> dict[str, float]:
    """The split fractions as drawn: with folds, the validation share stays in training (its folds validate)."""
    fractions = config.split_fractions
    if config.folds:
        training = round(fractions["training"] + fractions["validation"], 6)
        return {"training": training, "validation": 0.0, "test": fractions["test"]}
    return fractions


def _counts(manifest: pd.DataFrame, multi_label: bool = False) -> dict[str, dict[str, int]]:
    """Images per split and class (multi-label: images holding each class)."""
    if multi_label:
        manifest = manifest.assign(label=manifest["label"].str.split()).explode("label")
    counts = manifest.groupby(["split", "label"]).size()
    return {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS if split in counts}


def _fingerprint(records: list[Record], hashes: list[str], config: PrepareConfig) -> str:
    """sha256 over every record (name, label, group, given split, metadata, content hash) and the output settings
    (not the positive class: it changes no image, and `_with_positive_class` updates it in place)."""
    ignored = ("workers", "overwrite", "experiment", "positive_class")
    settings = {key: value for key, value in asdict(config).items() if key not in ignored}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record, sha256 in zip(records, hashes, strict=True):
        entry = [record.source, record.label, record.group, record.split, record.metadata, sha256]
        digest.update(json.dumps(entry, sort_keys=True).encode())
    return digest.hexdigest()


def _with_positive_class(output: Path, info: DatasetInfo, given: str | None) -> DatasetInfo:
    """`info` of an already prepared `output`, its positive class changed to `given` (dataset.json rewritten) when one
    is given and differs."""
    if given is None or given == info.positive_class:
        return info
    positive, _ = choose_positive_class(info.classes, given, info.task)
    info = replace(info, positive_class=positive)
    partial = output / f"{INFO_FILE}.partial"
    partial.write_text(info.to_json())
    os.replace(partial, output / INFO_FILE)
    print(f"{output}: positive class is now {positive!r}", file=sys.stderr)
    return info


def _check_apart(source: Path, output: Path) -> None:
    """Refuse an OUTPUT inside a SOURCE folder (the next prepare of SOURCE would find it as a class) or around
    SOURCE (replacing OUTPUT would delete the source)."""
    source, output = source.resolve(), output.resolve()
    if source.is_dir() and output.is_relative_to(source):
        raise UserError(f"{output}: OUTPUT is inside SOURCE {source}; choose an OUTPUT outside the source folder")
    if source.is_relative_to(output):
        raise UserError(f"{output}: OUTPUT holds SOURCE {source}; choose an OUTPUT outside the source")


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
    try:
        descriptor = processes.lock(path)
    except processes.Held:
        raise UserError(f"{output}: another prepare is writing OUTPUT; wait for it or choose another OUTPUT") from None
    except OSError as error:
        raise UserError(
            f"{path}: cannot create the lock file ({error.strerror}); check the permissions of OUTPUT's folder"
        ) from error
    try:
        yield
    finally:
        processes.unlock(descriptor, path)  # a prepare that opened the file meanwhile sees it gone
        for folder in [] if output.exists() else made:
            try:
                folder.rmdir()
            except OSError:  # not empty
                break


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
        self.pool = None
        if workers > 1:
            with _default_sigterm():
                self.pool = multiprocessing.Pool(workers)

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


@contextmanager
def _default_sigterm() -> Iterator[None]:
    """Fork workers with SIGTERM's default action, so terminate() ends them even when the parent caught SIGTERM
    (`classifier train` turns it into Ctrl-C): an inherited Python handler never runs while a worker blocks on the
    task queue, and setting it back in each worker would leave a window in which a worker cannot be stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread sets handlers, and only it can have set one
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(results: Iterator[Any], total: int, what: str, started: float | None = None) -> Iterable[Any]:
    """A bar over `results` whose rate is their mean since the work `started` (time.time(); default now).

    The writing bar is read only once the splits are drawn, by when many images are done: timed from its own start,
    with tqdm's smoothed rate, it would show those as millions of images a second."""
    bar = progress(results, total=total, desc=what, unit="image", smoothing=0)
    if started is not None:
        bar.start_t = started  # the elapsed time (and so the rate) counts from when the workers began
    return bar
