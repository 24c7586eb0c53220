"""Prepared splits decoded once into a uint8 array (in memory, or memory-mapped when large) and served as batches."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
    """One split: images N x C x H x W (uint8 for 8-bit data, float32 in [0, 1] for 16-bit) and class indices."""

    images: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    paths: list[str]


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
    index = {name: position for position, name in enumerate(info.classes)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise UserError(f"{root}/manifest.csv: labels {unknown} are not in dataset.json classes; prepare again")
    labels = rows["label"].map(index).to_numpy(np.int64)
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
    return SplitArrays(images, labels, rows["fold"].to_numpy(np.int64), paths)


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
    """Rows `indices` of a split array; `__getitems__` returns whole (images, labels) batches, augmented per image."""

    def __init__(self, arrays: SplitArrays, indices: np.ndarray | None = None, transform=None) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays.labels)) if indices is None else np.asarray(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.arrays.labels[self.indices]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([position])
        return images[0], int(labels[0])

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.indices[np.asarray(positions)]
        images = torch.from_numpy(np.ascontiguousarray(self.arrays.images[rows]))
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        return images, torch.from_numpy(self.arrays.labels[rows])


def batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`collate_fn` for `CachedImages`, whose `__getitems__` already returns a batch."""
    return batch
