"""Shared fixtures: tiny generated images, an isolated tracking store, a real `mlflow server` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist_trainval.npz"
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40)]


def class_image(label: int, index: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    """A learnable image: the class sets the base colour and a bright square's corner, the index adds noise."""
    rng = np.random.default_rng(1000 * label + index)
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = CLASS_COLOURS[label % len(CLASS_COLOURS)]
    pixels += rng.normal(0, 20, pixels.shape)
    corner_y, corner_x = divmod(label % 4, 2)
    rows = slice(corner_y * height // 2, (corner_y + 1) * height // 2)
    columns = slice(corner_x * width // 2, (corner_x + 1) * width // 2)
    pixels[rows, columns] = 255
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image.convert(mode) if mode != "RGB" else image


def write_class_folders(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 32), mode: str = "RGB", suffix: str = ".png"
) -> Path:
    """Write `counts[class]` generated images into `root/<class>/` and return `root`."""
    for label, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            class_image(label, index, size, mode).save(folder / f"{name}_{index:03d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 20 small RGB PNGs in class sub-folders."""
    return write_class_folders(tmp_path / "images", {"benign": 20, "malignant": 20})


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test tracks into its own SQLite store and never inherits a run from the environment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    # A URI set in-process (tracking.connect() in an earlier test) outranks the variable: point it here too.
    mlflow.set_tracking_uri(uri)
    return uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    """Poll `url` until it answers 200, failing early when `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_mlflow_server(store: Path, backend_uri: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` on a free loopback port over a store in `store`; return its URL and process."""
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    log = open(store / "server.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process)
    except Exception:
        process.kill()
        raise RuntimeError((store / "server.log").read_text()[-2000:]) from None
    return url, process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server subprocess shared by the session's tests; yields its URL."""
    url, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    process.terminate()
    process.wait(timeout=30)


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


requires_postgres = pytest.mark.skipif(
    not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres)"
)


def write_checkpoint(
    path: Path,
    classes: tuple[str, ...] = ("benign", "malignant"),
    size: int = 32,
    channels: int = 3,
    threshold: float | None = None,
) -> Path:
    """A checkpoint of an untrained simple_cnn, as training writes it (plus resume-only optimizer state)."""
    import torch

    from classifier.models import create_model

    torch.manual_seed(0)
    network = create_model("simple_cnn", len(classes), channels)
    checkpoint = {
        "architecture": "simple_cnn",
        "num_classes": len(classes),
        "in_chans": channels,
        "state_dict": network.state_dict(),
        "classes": list(classes),
        "preprocessing": {
            "size": size,
            "channels": channels,
            "bit_depth": 8,
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
            "resize": "stretch",
        },
        "config": {"model": "simple_cnn"},
        "threshold": threshold,
        "optimizer": torch.optim.SGD(network.parameters(), lr=0.1).state_dict(),
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A two-class (benign, malignant) 32 px RGB checkpoint file."""
    return write_checkpoint(tmp_path / "checkpoint.pt")


@pytest.fixture
def experiment(tmp_path: Path) -> str:
    """An MLflow experiment whose artifacts stay in the test's folder (the Default one writes ./mlruns)."""
    import mlflow

    return mlflow.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
