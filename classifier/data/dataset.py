"""Prepared splits decoded once into a uint8 array (in memory, or memory-mapped when large) and served as batches.

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
from tqdm import tqdm

from classifier.data.layout import DatasetInfo, read_info, read_manifest
from classifier.errors import UserError

CACHE_FOLDER = ".cache"
PROGRESS_FROM = 2000  # images; smaller splits decode in about a second
MEMORY_SHARE = 0.25  # decode into RAM when the split takes at most this share of the available memory


@dataclass
class SplitArrays:
    """One split: images N x C x H x W (uint8 for 8-bit data, float32 in [0, 1] for 16-bit), labels (class indices
    or multi-hot rows), folds, and the manifest rows (paths, metadata columns)."""

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
    dtype = np.float32 if info.bit_depth == 16 else np.uint8
    shape = (len(paths), info.channels, info.size, info.size)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if cache == "auto":
        cache = "memory" if nbytes <= MEMORY_SHARE * psutil.virtual_memory().available else "memmap"
    if cache == "memory":
        images = np.empty(shape, dtype)
        _decode_into(images, root, paths, info)
    else:
        images = _memory_mapped(root, info, paths, shape, dtype)
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


def _memory_mapped(root: Path, info: DatasetInfo, paths: list[str], shape: tuple, dtype: type) -> np.ndarray:
    """A `.npy` named after the dataset fingerprint and the rows, decoded once and shared by later runs."""
    key = pd.util.hash_pandas_object(pd.Series(paths), index=False).sum() % (1 << 48)
    path = Path(root) / CACHE_FOLDER / f"{info.fingerprint[:16]}-{key:012x}.npy"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        _decode_into(images, root, paths, info)
        images.flush()
        del images
        os.replace(partial, path)
    return np.load(path, mmap_mode="r")


def _decode_into(images: np.ndarray, root: Path, paths: list[str], info: DatasetInfo) -> None:
    scale = 65535.0 if info.bit_depth == 16 else None

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
        images[position] = pixels / scale if scale else pixels

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        work = pool.map(decode, range(len(paths)))
        progress = tqdm(work, total=len(paths), desc="decoding images", unit="img", leave=False, mininterval=1)
        for _ in progress if len(paths) >= PROGRESS_FROM else work:
            pass


class CachedImages(Dataset):
    """Rows `indices` of a split array; `__getitems__` returns whole batches (see the module doc), augmented per image.

    `metadata` is the split's encoded metadata (one row per image of the split), or None for image-only models.
    """

    def __init__(
        self,
        arrays: SplitArrays,
        indices: np.ndarray | None = None,
        transform=None,
        metadata: np.ndarray | None = None,
    ) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays.labels)) if indices is None else np.asarray(indices)
        self.transform = transform
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
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        labels = torch.from_numpy(self.arrays.labels[rows])
        if self.metadata is None:
            return images, labels
        return (images, self.metadata[torch.from_numpy(rows)]), labels


def batched(batch: tuple[Any, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """`collate_fn` for `CachedImages`, whose `__getitems__` already returns a batch."""
    return batch
