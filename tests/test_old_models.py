"""Models logged before the package was regrouped (flat `classifier/` modules, checked in as a tarball) still load and
predict: in this process, where today's package is already imported, and in a fresh one, as `mlflow models serve`."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import class_image

from classifier.model.pyfunc import ImageClassifier, load_classifier, read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "model-v0.1.tar.gz"
PROBABILITIES = ["prob_normal", "prob_pneumonia"]


@pytest.fixture
def old_model(tmp_path: Path) -> Path:
    """A simple_cnn model (8 px grey, normal/pneumonia) logged by the flat layout of commit 790ab88."""
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "model-v0.1"


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for label in (0, 1):
        for index in range(3):
            path = tmp_path / f"image_{label}_{index}.png"
            class_image(label, index, size=(8, 8), mode="L").save(path)
            paths.append(str(path))
    return paths


def expected_probabilities(old_model: Path, images: list[str]) -> np.ndarray:
    """What today's code says about the images given the old model's own checkpoint."""
    checkpoint = read_checkpoint(old_model / "artifacts" / "checkpoint.pt")
    table = ImageClassifier(checkpoint).predict(pd.Series(images))
    return table[PROBABILITIES].to_numpy()


def test_an_old_model_predicts_in_a_process_that_imported_todays_package(old_model, images):
    predictions = load_classifier(str(old_model)).predict(pd.Series(images))

    assert predictions["error"].isna().all()
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), expected_probabilities(old_model, images), 1e-6)
    assert set(predictions["label"]) <= {"normal", "pneumonia"}


def test_an_old_model_predicts_with_its_own_code_in_a_fresh_process(old_model, images, tmp_path):
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import classifier\n"
        "print(classifier.__file__)\n"
        "model.predict(pd.DataFrame({'image': sys.argv[2:]})).to_csv(sys.argv[1] + '.csv', index=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(old_model), *images], capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).is_relative_to(old_model / "code"), "the model ran on its own logged code"
    predictions = pd.read_csv(f"{old_model}.csv")
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), expected_probabilities(old_model, images), 1e-6)
    assert torch.load(old_model / "artifacts" / "checkpoint.pt", weights_only=True)["architecture"] == "simple_cnn"
