"""Shared fixtures: tiny generated images, an isolated tracking store, a real `mlflow server` subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
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
TRACKING_STORE = "mlflow.db"
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


@pytest.fixture(scope="session")
def tracking_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One empty SQLite tracking store with MLflow's schema, copied for each test (migrating takes a second or two)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "mlruns")).engine.dispose()
    return path


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking_template: Path) -> str:
    """Every test tracks into its own SQLite store, `tmp_path/mlflow.db` (the default journal goes beside it), and
    never inherits a run from the environment."""
    store = tmp_path / TRACKING_STORE
    shutil.copyfile(tracking_template, store)
    with contextlib.closing(sqlite3.connect(store)) as database, database:  # the Default experiment's artifacts here
        database.execute("UPDATE experiments SET artifact_location = ?", (str(tmp_path / "mlruns" / "0"),))
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    # A URI set in-process (tracking.connect() in an earlier test) outranks the variable: point it here too.
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="module")
def grey_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 20 grey 16 px images, prepared (60/20/20), shared by a module's tests."""
    from prepared import prepared_dataset  # not at the top: prepared imports this module

    return prepared_dataset(tmp_path_factory.mktemp("grey"), {"benign": 20, "malignant": 20}, mode="L")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Decoded-image caches go to the test's folder, never the user's cache folder."""
    monkeypatch.setenv("CLASSIFIER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def written(folder: Path) -> list[str]:
    """The names in `folder`, but for the test's tracking store (see tracked_nothing)."""
    return sorted(path.name for path in folder.iterdir() if path.name != TRACKING_STORE)


def tracked_nothing() -> bool:
    """Whether the test's tracking store holds no run and no experiment but MLflow's Default."""
    import mlflow

    experiments = [experiment.name for experiment in mlflow.search_experiments()]
    return experiments == ["Default"] and not mlflow.search_runs(search_all_experiments=True, output_format="list")


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

    from classifier.nets.models import create_model

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


def metric_steps(run_id: str, metric: str = "val_loss") -> list[int]:
    """The steps a run logged `metric` at, sorted."""
    import mlflow

    return sorted(entry.step for entry in mlflow.MlflowClient().get_metric_history(run_id, metric))


def run_status(run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).info.status


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None, what: str = "condition") -> None:
    """Poll `condition()` until true; fail after `timeout` s or when `process` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def train_command(data: Path, output: Path, epochs: int) -> list[str]:
    """`classifier train` of this environment on `data`, tiny and quick, checkpoints under `output`."""
    command = [str(Path(sys.executable).with_name("classifier")), "train", str(data), "--epochs", str(epochs)]
    command += ["--batch-size", "8", "--augment", "none", "--system-metrics", "false", "--num-workers", "0"]
    return command + ["--output-dir", str(output)]
