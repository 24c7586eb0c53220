"""The decoded-image cache: in a cache folder keyed by the dataset fingerprint (datasets may be read-only), written
atomically, decoded once and shared by every process, budgeted against the cgroup limit, 16-bit kept as uint16."""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for
from PIL import Image
from prepared import prepared_dataset

from classifier.config import PrepareConfig
from classifier.data import dataset as dataset_module
from classifier.data.batches import DeviceBatches
from classifier.data.dataset import CachedImages, available_memory, load_split
from classifier.data.layout import read_info
from classifier.data.prepare import prepare
from classifier.data.transforms import unit_range
from classifier.errors import UserError

SLOW_DECODE = """
import sys, time
from classifier.data import dataset
opened = dataset.Image.open
dataset.Image.open = lambda *args, **kwargs: (time.sleep(0.01), opened(*args, **kwargs))[1]
decode = dataset._decode_to_file
dataset._decode_to_file = lambda *args: (print("decoding", flush=True), decode(*args))
dataset.load_split(sys.argv[1], "training", "memmap")
print("loaded", flush=True)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("cache"), {"a": 120, "b": 120}, fractions=(0.8, 0.2, 0.0))


def files_under(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(folder.rglob("*"))}


def test_a_read_only_dataset_is_cached_in_the_cache_folder(data: Path, tmp_path: Path, isolated_cache: Path) -> None:
    copy = tmp_path / "read-only"
    shutil.copytree(data, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = files_under(copy)
    try:
        mapped = load_split(copy, "training", cache="memmap")
        in_memory = load_split(copy, "training", cache="memory")
        assert files_under(copy) == before  # nothing written into the dataset
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)

    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    assert np.array_equal(np.asarray(mapped.images), in_memory.images)
    (cached,) = isolated_cache.rglob("*.npy")
    assert cached.parent.name == read_info(copy).fingerprint[:32]
    assert sorted(path.name for path in isolated_cache.rglob("*")) == [cached.parent.name, cached.name]


def test_an_unwritable_cache_folder_is_one_line(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSIFIER_CACHE_DIR", str(tmp_path / "file" / "cache"))
    (tmp_path / "file").write_text("not a folder")

    with pytest.raises(UserError, match="cannot write the image cache .*; set CLASSIFIER_CACHE_DIR"):
        load_split(data, "validation", cache="memmap")


def test_a_killed_decode_leaves_no_partial_cache_for_the_next(data: Path, isolated_cache: Path) -> None:
    decoding = subprocess.Popen([sys.executable, "-c", SLOW_DECODE, str(data)], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: list(isolated_cache.rglob("*.partial")), 120, decoding, "a partial cache file")
    decoding.send_signal(signal.SIGKILL)
    decoding.wait()
    assert list(isolated_cache.rglob("*.partial"))  # what a kill leaves

    rerun = subprocess.run([sys.executable, "-c", SLOW_DECODE, str(data)], capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [path.suffix for path in isolated_cache.rglob("*") if path.is_file()] == [".npy"]
    mapped = np.load(next(isolated_cache.rglob("*.npy")), mmap_mode="r")
    assert np.array_equal(mapped, load_split(data, "training", cache="memory").images)


def test_processes_loading_one_split_at_once_share_one_decode(data: Path, isolated_cache: Path) -> None:
    loaders = [
        subprocess.Popen([sys.executable, "-c", SLOW_DECODE, str(data)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [loader.communicate(timeout=300)[0] for loader in loaders]

    assert all(loader.returncode == 0 for loader in loaders)
    assert "".join(outputs).count("decoding") == 1 and "".join(outputs).count("loaded") == 3
    assert len(list(isolated_cache.rglob("*.npy"))) == 1


def test_the_memory_budget_is_the_cgroup_limit_when_lower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = 8 << 30  # fixed: the host's real figure moves between two reads
    monkeypatch.setattr(dataset_module.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=host))
    v2 = tmp_path / "v2"
    (v2 / "docker" / "abc").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "docker" / "memory.max").write_text(f"{2 << 30}\n")
    (v2 / "docker" / "memory.current").write_text(f"{1 << 30}\n")
    (v2 / "docker" / "abc" / "memory.max").write_text("max\n")
    (v2 / "docker" / "abc" / "memory.current").write_text("1000\n")
    (tmp_path / "cgroup-v2").write_text("0::/docker/abc\n")
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)  # inside a container: its own cgroup at the root
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{3 << 29}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 29}\n")
    (tmp_path / "cgroup-v1").write_text("12:cpu,cpuacct:/x\n11:memory:/kubepods/pod1\n")

    assert available_memory(v2, tmp_path / "cgroup-v2") == min(host, 1 << 30)  # the parent's limit binds
    assert available_memory(v1, tmp_path / "cgroup-v1") == min(host, 1 << 30)
    assert available_memory(tmp_path, tmp_path / "none") == host


def test_sixteen_bit_data_is_cached_as_uint16_and_served_in_zero_one(tmp_path: Path) -> None:
    source = tmp_path / "images"
    for label, level in (("low", 1000), ("high", 60000)):
        (source / label).mkdir(parents=True)
        for index in range(6):
            Image.fromarray(np.full((8, 8), level + index, dtype=np.uint16)).save(source / label / f"{index}.tif")
    prepare(source, tmp_path / "data", PrepareConfig(size=8, fractions=[1.0, 0.0, 0.0], workers=1))

    for cache in ("memory", "memmap"):
        arrays = load_split(tmp_path / "data", "training", cache=cache)
        assert arrays.images.dtype == np.uint16 and arrays.images.max() >= 60000
        images, _ = CachedImages(arrays).__getitems__(list(range(len(arrays.labels))))
        (on_device, _), *_ = DeviceBatches(CachedImages(arrays), len(arrays.labels), torch.device("cpu"))
        assert images.dtype == on_device.dtype == torch.uint16 and torch.equal(images, on_device)
        np.testing.assert_allclose(unit_range(images).numpy(), arrays.images / 65535.0, rtol=1e-6)
