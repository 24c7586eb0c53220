"""images/s of `classifier prepare` against a single-process Pillow loop (open, resize, save) over the same tiles.

Usage: .venv/bin/python bench/prepare_bench.py [--images 200] [--width 2048] [--height 1536] [--size 256] [--repeats 1]
Writes the tiles to a temporary folder, times both, prints the figures and the ratio (target >= 1.8x on 2 cores).
The first in-process prepare() also imports scikit-learn (as the command does); --repeats keeps the fastest run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from classifier.config import PrepareConfig
from classifier.data.prepare import prepare


def write_tiles(root: Path, count: int, width: int, height: int) -> None:
    """`count` RGB tifs in two class folders: colour blobs with fine grain, like stained tissue at 20x."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        blobs = Image.fromarray(rng.integers(60, 230, (height // 32, width // 32, 3), dtype=np.uint8))
        tissue = np.asarray(blobs.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)
        grain = rng.integers(0, 24, (height, width, 1), dtype=np.uint8)
        Image.fromarray(tissue + grain).save(folder / f"tile_{index:03d}.tif")


def pillow_loop(source: Path, output: Path, size: int) -> int:
    """The baseline a user would write: open, resize with BICUBIC, save as PNG, one image at a time."""
    files = sorted(source.rglob("*.tif"))
    for path in files:
        target = output / path.relative_to(source).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.resize((size, size), Image.Resampling.BICUBIC).save(target)
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="time each N times and keep the fastest (busy machines)")
    args = parser.parse_args()
    classifier = Path(sys.executable).with_name("classifier")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as folder:
        root = Path(folder)
        write_tiles(root / "tiles", args.images, args.width, args.height)
        megabytes = sum(path.stat().st_size for path in (root / "tiles").rglob("*.tif")) / 2**20
        print(f"{args.images} tiles of {args.width}x{args.height} RGB tif ({megabytes:.0f} MB), {os.cpu_count()} cores")
        environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        command = [str(classifier), "prepare", str(root / "tiles"), str(root / "out"), "--size", str(args.size)]
        quiet = {"check": True, "env": environment, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        works = {
            "pillow loop (1 process)": lambda: pillow_loop(root / "tiles", root / "out", args.size),
            "classifier prepare command": lambda: subprocess.run(command, **quiet),
            "prepare() in this process": lambda: in_process(root / "tiles", root / "out", args.size),
        }
        loads = [os.getloadavg()[0]]
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for name, work in works.items():
                timing = measure(work)
                shutil.rmtree(root / "out")
                best[name] = min(best.get(name, timing), timing)
        loads.append(os.getloadavg()[0])

    count = args.images
    for name, (wall, cpu) in best.items():
        print(f"{name:28s} {count / wall:6.1f} images/s  {1000 * cpu / count:5.1f} ms CPU/image")
    print(
        f"load average before/after: {loads[0]:.1f}/{loads[1]:.1f} (other processes share these {os.cpu_count()} "
        f"cores); fastest of {args.repeats} run(s)"
    )
    baseline = best["pillow loop (1 process)"][0]
    print(
        f"ratio: {baseline / best['classifier prepare command'][0]:.2f}x command, "
        f"{baseline / best['prepare() in this process'][0]:.2f}x without start-up (target >= 1.8x)"
    )


def in_process(source: Path, output: Path, size: int) -> None:
    """prepare() called here, its progress bars silenced like the command's."""
    with contextlib.redirect_stderr(io.StringIO()):
        prepare(source, output, PrepareConfig(size=size))


def measure(work: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process and its finished children, pool workers included) of `work`."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, cpu + finished.ru_utime - children.ru_utime + finished.ru_stime - children.ru_stime


if __name__ == "__main__":
    main()
