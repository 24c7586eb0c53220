"""Inference throughput: `classifier predict` and `classifier serve`'s POST /predict against the bare PyTorch model.

All label the same PNG files with the same network and batch size. The baseline runs the network on tensors that
are already decoded, resized and normalised, so the ratios show what decoding, per-file error handling, the CSV and
HTTP cost on top of the model itself.

    python bench/predict_bench.py [--model simple_cnn] [--size 64] [--source-size 64] [--images 512] [--batch-size 64]

`--source-size` sets the side of the PNG files (decoding and resizing grow with it); `--size` the model's input.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from classifier.model.pyfunc import load_classifier
from classifier.nets.models import create_model

BIN = Path(sys.executable).parent


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` RGB PNGs of `size` px (smooth gradients plus noise, so PNG decoding does real work)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    paths = []
    for index in range(count):
        pixels = ramp[None, :, None] + ramp[:, None, None] * rng.random(3) + rng.normal(0, 12, (size, size, 3))
        paths.append(folder / f"image_{index:05d}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(paths[-1])
    return paths


def write_checkpoint(path: Path, model: str, size: int) -> Path:
    torch.manual_seed(0)
    network = create_model(model, 2, 3)
    preprocessing = {"size": size, "channels": 3, "bit_depth": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    checkpoint = {"architecture": model, "num_classes": 2, "in_chans": 3, "state_dict": network.state_dict()}
    checkpoint |= {"classes": ["a", "b"], "preprocessing": preprocessing | {"resize": "stretch"}, "threshold": None}
    torch.save(checkpoint, path)
    return path


def fastest_rates(count: int, methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Images/s of each method's fastest of `repeats` timed calls, taken in turns (after one warm-up call each), so
    that load from elsewhere on the machine disturbs all methods alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for run in methods.values():
        run()
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: count / min(seconds) for name, seconds in times.items()}


def bare_model(checkpoint: Path, paths: list[Path], batch_size: int) -> Callable[[], None]:
    """The network alone on preprocessed, normalised tensors held in memory."""
    classifier = load_classifier(str(checkpoint), inference_batch_size=batch_size, inference_device="cpu")
    tensors = classifier.normalise(torch.stack([classifier.preprocess(path) for path in paths]))

    @torch.inference_mode()
    def run() -> None:
        for batch in tensors.split(batch_size):
            classifier.network(batch).softmax(dim=1).numpy()

    return run


def in_process_predict(checkpoint: Path, paths: list[Path], batch_size: int) -> Callable[[], object]:
    """`ImageClassifier.predict` over the files: what `classifier predict` runs after start-up."""
    classifier = load_classifier(str(checkpoint), inference_batch_size=batch_size, inference_device="cpu")
    return lambda: classifier.predict(paths)


def cli_seconds(checkpoint: Path, target: Path, batch_size: int, output: Path) -> float:
    """Wall time of a `classifier predict` process over `target`, start-up included."""
    command = [str(BIN / "classifier"), "predict", str(checkpoint), str(target), "--output", str(output)]
    start = time.perf_counter()
    subprocess.run([*command, "--batch-size", str(batch_size), "--device", "cpu"], check=True, capture_output=True)
    return time.perf_counter() - start


@contextmanager
def served(checkpoint: Path, batch_size: int) -> Iterator[str]:
    """A running `classifier serve` of `checkpoint`; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(BIN / "classifier"), "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
    command += ["--batch-size", str(batch_size)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while server.poll() is None:
            try:
                requests.get(f"{url}/health", timeout=1).raise_for_status()
                break
            except requests.ConnectionError:
                time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def posting(url: str, paths: list[Path], batch_size: int, session: requests.Session) -> Callable[[], None]:
    """POST /predict with `batch_size` files per request, one request at a time."""
    requests_files = [
        [("files", (path.name, path.read_bytes(), "image/png")) for path in paths[start : start + batch_size]]
        for start in range(0, len(paths), batch_size)
    ]

    def run() -> None:
        for files in requests_files:
            session.post(f"{url}/predict", files=files, timeout=300).raise_for_status()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--source-size", type=int)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes per method; the fastest counts.")
    args = parser.parse_args()
    source_size = args.source_size or args.size
    threads = torch.get_num_threads()
    setting = f"{args.model} at {args.size} px, batch {args.batch_size}, {threads} threads"
    print(f"{args.images} PNGs of {source_size} px; {setting}")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = write_images(scratch / "images", args.images, source_size)
        write_images(scratch / "one", 1, source_size)
        checkpoint = write_checkpoint(scratch / "checkpoint.pt", args.model, args.size)

        startup = cli_seconds(checkpoint, scratch / "one", args.batch_size, scratch / "one.csv")
        cli = cli_seconds(checkpoint, scratch / "images", args.batch_size, scratch / "all.csv")
        with served(checkpoint, args.batch_size) as url, requests.Session() as session:
            methods = {
                "bare model on preprocessed tensors": bare_model(checkpoint, paths, args.batch_size),
                "predict in process (decode + model)": in_process_predict(checkpoint, paths, args.batch_size),
                f"classifier serve POST /predict ({args.batch_size} files/request)": posting(
                    url, paths, args.batch_size, session
                ),
            }
            rates = fastest_rates(args.images, methods, args.repeats)

    bare = rates["bare model on preprocessed tensors"]
    rates[f"classifier predict CLI, incl. {startup:.1f} s start-up"] = args.images / cli
    rates["classifier predict CLI, start-up excluded"] = args.images / max(cli - startup, 1e-9)
    for name, rate in rates.items():
        print(f"{name:<58} {rate:9.1f} images/s  {rate / bare:6.3f}x bare")


if __name__ == "__main__":
    main()
