"""`classifier prepare` as users run it: killed and rerun, tracked in MLflow, and through `mlflow run . -e prepare`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, write_class_folders, written
from PIL import Image

from classifier.cli import main
from classifier.config import PrepareConfig
from classifier.data import prepare as prepare_module
from classifier.data.layout import read_info, read_manifest
from classifier.data.prepare import prepare

CLASSIFIER = Path(sys.executable).with_name("classifier")


def write_tiles(root: Path, per_class: int, size: tuple[int, int] = (1024, 768)) -> Path:
    """Uncompressed tifs big enough that writing them takes a while."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((size[1], size[0], 3), rng.integers(0, 255, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index:03d}.tif")
    return root


def test_a_killed_prepare_leaves_no_dataset_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, output = write_tiles(tmp_path / "tiles", per_class=25), tmp_path / "out"
    staging = tmp_path / ".out.partial"
    command = [CLASSIFIER, "prepare", source, output, "--size", "64", "--workers", "1"]
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and any(staging.rglob("*.png"))) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert any(staging.rglob("*.png")) and not output.exists()  # killed while writing: no half dataset in OUTPUT

    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert not staging.exists() and not (tmp_path / ".out.lock").exists()  # the killed run's lock is no obstacle
    assert len(read_manifest(output)) == 50 and len(list(output.rglob("*.png"))) == 50
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    prepare(source, tmp_path / "clean", PrepareConfig(size=64, workers=1))
    assert (output / "manifest.csv").read_bytes() == (tmp_path / "clean" / "manifest.csv").read_bytes()


def test_a_prepare_into_an_output_another_process_is_writing_fails_at_once(image_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    command = [CLASSIFIER, "prepare", image_folder, output, "--size", "16", "--workers", "2"]
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    with prepare_module._exclusive(output):  # as a running prepare holds it
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1] == (
        f"Error: {output}: another prepare is writing OUTPUT; wait for it or choose another OUTPUT"
    )
    assert not output.exists() and not (tmp_path / ".out.partial").exists()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert len(read_manifest(output)) == 40 and not (tmp_path / ".out.lock").exists()


def test_a_failure_while_writing_removes_the_partial_dataset(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    calls = []
    convert = prepare_module._Converter.__call__

    def failing(self: prepare_module._Converter, job: prepare_module.Job) -> prepare_module.Converted:
        calls.append(job)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return convert(self, job)

    monkeypatch.setattr(prepare_module._Converter, "__call__", failing)
    config = PrepareConfig(size=16, workers=1)
    with pytest.raises(OSError, match="No space left"):
        prepare(image_folder, tmp_path / "out", config)
    assert written(tmp_path) == ["images"]

    monkeypatch.setattr(prepare_module._Converter, "__call__", convert)
    assert sum(sum(n.values()) for n in prepare(image_folder, tmp_path / "out", config).counts.values()) == 40


def test_the_prepare_command_logs_params_counts_manifest_and_dataset_input(
    image_folder: Path, tmp_path: Path, isolated_tracking: str
) -> None:
    (image_folder / "benign" / "broken.png").write_bytes(b"")
    arguments = ["prepare", str(image_folder), str(tmp_path / "out"), "--size", "16", "--workers", "1"]
    result = CliRunner().invoke(main, [*arguments, "--skip-invalid", "--experiment", "prepare-test"])
    assert result.exit_code == 0, result.output  # MLFLOW_TRACKING_URI is set (conftest): the command logs a run
    info = read_info(tmp_path / "out")

    mlflow.set_tracking_uri(isolated_tracking)
    (run,) = mlflow.search_runs(experiment_names=["prepare-test"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["size"] == "16" and run.data.params["fingerprint"] == info.fingerprint
    assert run.data.metrics["images_training_benign"] == info.counts["training"]["benign"]
    assert run.data.metrics["images_test"] == sum(info.counts["test"].values())
    assert run.data.metrics["images_skipped"] == 1
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "dataset")}
    assert artifacts == {"dataset/manifest.csv", "dataset/dataset.json"}
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "out"
    assert '"num_rows": 40' in dataset_input.dataset.profile


@pytest.mark.slow
def test_mlflow_run_prepare_entry_point(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "images", {"cat": 10, "dog": 10}, mode="L")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    command = [Path(sys.executable).with_name("mlflow"), "run", REPO, "-e", "prepare", "--env-manager", "local"]
    command += ["--experiment-name", "prepare-e2e", "-P", f"source={tmp_path / 'images'}"]
    command += ["-P", f"output={tmp_path / 'out'}", "-P", "size=16", "-P", "workers=1", "-P", "folds=2"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `classifier` of this environment
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]

    info = read_info(tmp_path / "out")
    assert info.channels == 1 and info.folds == 2 and info.size == 16
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["prepare-e2e"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["folds"] == "2" and run.data.params["fingerprint"] == info.fingerprint
    assert run.data.metrics["images_training"] == sum(info.counts["training"].values())
    assert [item.dataset.name for item in run.inputs.dataset_inputs] == ["out"]


def test_prepare_itself_tracks_nothing(image_folder: Path, tmp_path: Path, isolated_tracking: str) -> None:
    prepare(image_folder, tmp_path / "out", PrepareConfig(size=16, workers=1, experiment="untracked"))

    mlflow.set_tracking_uri(isolated_tracking)
    assert mlflow.get_experiment_by_name("untracked") is None
