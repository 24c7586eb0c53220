"""Prepared splits decoded once into an array (in memory, or memory-mapped when large) and served as batches.

The memory-mapped cache lives in a cache folder, never in the dataset (which may be read-only): `CLASSIFIER_CACHE_DIR`,
else `$XDG_CACHE_HOME/classifier` or `~/.cache/classifier`, one sub-folder per dataset fingerprint. One process
decodes a split while the others wait on its lock, then all of them map the same file read-only (the page cache
holds one copy); the file is written under a temporary name and renamed into place, and a temporary one left by a
killed decode is removed by the next.

A batch is `(images, labels)`, or `((images, metadata), labels)` when the model also takes encoded metadata; labels
are class indices (single-label) or an N x C multi-hot float matrix (multi-label).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from PIL import Image
from torch.utils.data import Dataset

from classifier import processes, stopping
from classifier.console import progress
from classifier.data.layout import DatasetInfo, read_info, read_manifest
from classifier.errors import UserError

CACHE_ENV = "CLASSIFIER_CACHE_DIR"
PROGRESS_FROM = 2000  # images; smaller splits decode in about a second
MEMORY_SHARE = 0.25  # decode into RAM when the split takes at most this share of the available memory
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class SplitArrays:
    """One split: images N x C x H x W (uint8 for 8-bit data, uint16 for 16-bit), labels (class indices or multi-hot
    rows), folds, and the manifest rows (paths, metadata columns)."""

    images: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    rows: pd.DataFrame

    @property
    def paths(self) -> list[str]:
        return self.rows["path"].tolist()


def load_split(root: Path, split: str, cache: str = "auto") -> SplitArrays:
    """All images of `split`, decoded once per process (k-fold runs and trials share them)."""
    root = Path(root).resolve()
    info = read_info(root)
    return _load_split(root, info.fingerprint, split, cache)


@functools.lru_cache(maxsize=4)
def _load_split(root: Path, fingerprint: str, split: str, cache: str) -> SplitArrays:
    info = read_info(root)
    rows = read_manifest(root)
    rows = rows[rows["split"] == split]
    labels = label_array(rows["label"].tolist(), info, f"{root}/manifest.csv")
    paths = rows["path"].tolist()
    dtype = np.uint16 if info.bit_depth == 16 else np.uint8
    shape = (len(paths), info.channels, info.size, info.size)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if cache == "auto":
        cache = "memory" if nbytes <= MEMORY_SHARE * available_memory() else "memmap"
    if cache == "memory":
        images = np.empty(shape, dtype)
        _decode_into(images, root, paths, info)
    else:
        images = _memory_mapped(root, info, split, paths, shape, dtype)
    return SplitArrays(images, labels, rows["fold"].to_numpy(np.int64), rows.reset_index(drop=True))


def label_array(labels: list[str], info: DatasetInfo, where: str) -> np.ndarray:
    """Class indices, or for multi-label data (space-separated class lists) an N x C multi-hot float32 matrix."""
    index = {name: position for position, name in enumerate(info.classes)}
    multi_label = info.task == "multi_label"
    named = [label.split() if multi_label else [label] for label in labels]
    unknown = sorted({name for names in named for name in names} - set(index))
    if unknown:
        raise UserError(f"{where}: labels {unknown} are not in dataset.json classes; prepare again")
    if not multi_label:
        return np.array([index[names[0]] for names in named], dtype=np.int64)
    onehot = np.zeros((len(named), len(info.classes)), dtype=np.float32)
    for row, names in enumerate(named):
        onehot[row, [index[name] for name in names]] = 1.0
    return onehot


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: a bincount of class indices, or the column sums of multi-hot rows."""
    if labels.ndim == 2:
        return labels.sum(axis=0).astype(np.int64)
    return np.bincount(labels, minlength=num_classes)


def fit_indices(info: DatasetInfo, training: SplitArrays, fold: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of the training split to train on, and (k-fold data) the rows of fold `fold` to validate on."""
    if not info.folds:
        if fold is not None:
            raise UserError("the dataset has no folds; prepare it with `classifier prepare --folds K` to use folds")
        return np.arange(len(training.labels)), None
    fold = 0 if fold is None else fold
    if not 0 <= fold < info.folds:
        raise UserError(f"fold {fold} does not exist; the dataset has folds 0..{info.folds - 1}")
    return np.flatnonzero(training.folds != fold), np.flatnonzero(training.folds == fold)


def cache_folder() -> Path:
    """Where decoded splits are cached: `CLASSIFIER_CACHE_DIR`, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "classifier"


def available_memory(cgroup_root: Path = CGROUP_ROOT, own_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Bytes this process may still take: the host's available memory, or less where a cgroup limit (a container's
    memory limit, cgroup v2 or v1) leaves less."""
    available = psutil.virtual_memory().available
    for limit_file, usage_file in _cgroup_memory_files(cgroup_root, own_cgroup):
        try:
            limit = limit_file.read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
                available = min(available, max(0, int(limit) - int(usage_file.read_text())))
        except (OSError, ValueError):
            continue
    return available


def _cgroup_memory_files(cgroup_root: Path, own_cgroup: Path) -> list[tuple[Path, Path]]:
    """(limit, usage) files of this process's memory cgroup and every cgroup above it."""
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, names = cgroup_root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, names = cgroup_root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = base / path.lstrip("/")
        if not folder.is_dir():  # a container sees its own cgroup at the root
            folder = base
        for level in (folder, *folder.parents):
            files.append((level / names[0], level / names[1]))
            if level == base:
                break
    return files


def _memory_mapped(
    root: Path, info: DatasetInfo, split: str, paths: list[str], shape: tuple, dtype: type
) -> np.ndarray:
    """The split as a read-only memory map of `<cache folder>/<fingerprint>/<split>-<rows>.npy`, decoded once (by
    whichever process takes the lock first) and shared by every later run and process."""
    key = pd.util.hash_pandas_object(pd.Series(paths), index=False).sum() % (1 << 48)
    folder = cache_folder() / info.fingerprint[:32]
    path = folder / f"{split}-{key:012x}.npy"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = processes.lock(folder / f".{path.name}.lock", wait=True)  # one decodes, the others wait
        except OSError as error:
            raise UserError(
                f"{folder}: cannot write the image cache ({error.strerror}); set {CACHE_ENV} to a writable folder"
            ) from error
        try:
            if not path.exists():
                _decode_to_file(path, root, paths, info, shape, dtype)
        finally:
            processes.unlock(descriptor, folder / f".{path.name}.lock")
    return np.load(path, mmap_mode="r")


def _decode_to_file(path: Path, root: Path, paths: list[str], info: DatasetInfo, shape: tuple, dtype: type) -> None:
    """Decode into `path` through a temporary file renamed into place (the caller holds the lock: a temporary file
    found here was left by a killed decode)."""
    partial = path.with_name(f"{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        _decode_into(images, root, paths, info)
        images.flush()
        del images
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _decode_into(images: np.ndarray, root: Path, paths: list[str], info: DatasetInfo) -> None:
    """Decode every prepared image into `images`, stopping between images on a stop request."""

    def decode(position: int) -> None:
        file = Path(root) / paths[position]
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image)
        except OSError as error:
            raise UserError(f"{file}: cannot read prepared image ({error}); prepare the dataset again") from error
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        if pixels.shape != images.shape[1:]:
            raise UserError(f"{file}: shape {pixels.shape} differs from dataset.json {images.shape[1:]}; prepare again")
        images[position] = pixels

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        work = pool.map(decode, range(len(paths)))
        bar = {"desc": "decoding images", "unit": "img", "leave": False, "mininterval": 1}
        for _ in progress(work, total=len(paths), disable=len(paths) < PROGRESS_FROM, **bar):
            stopping.check()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or a stop: no image more


class CachedImages(Dataset):
    """Rows `indices` of a split array; `__getitems__` returns whole batches (see the module doc) of the images as
    cached (uint8 or uint16): scaling, augmentation and normalisation happen batched on the device.

    `metadata` is the split's encoded metadata (one row per image of the split), or None for image-only models.
    """

    def __init__(
        self, arrays: SplitArrays, indices: np.ndarray | None = None, metadata: np.ndarray | None = None
    ) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays.labels)) if indices is None else np.asarray(indices)
        self.metadata = None if metadata is None else torch.from_numpy(metadata)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.arrays.labels[self.indices]

    def __getitem__(self, position: int) -> tuple[Any, torch.Tensor]:
        inputs, labels = self.__getitems__([position])
        if isinstance(inputs, tuple):
            return (inputs[0][0], inputs[1][0]), labels[0]
        return inputs[0], labels[0]

    def __getitems__(self, positions: list[int]) -> tuple[Any, torch.Tensor]:
        rows = self.indices[np.asarray(positions)]
        images = torch.from_numpy(np.ascontiguousarray(self.arrays.images[rows]))
        labels = torch.from_numpy(self.arrays.labels[rows])
        if self.metadata is None:
            return images, labels
        return (images, self.metadata[torch.from_numpy(rows)]), labels


def batched(batch: tuple[Any, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """`collate_fn` for `CachedImages`, whose `__getitems__` already returns a batch."""
    return batch
