"""Both HTTP services as users run them: `classifier serve` and `mlflow models serve`, real processes and requests."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import class_image, free_port, wait_for_http, write_checkpoint
from PIL import Image

from classifier.model.pyfunc import load_classifier, log_classifier_model

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CLASSES = ["benign", "malignant"]
MAX_UPLOAD_MB = 0.02


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def running(command: list[str], health: str, log: Path) -> Iterator[str]:
    """Start a server on a free port (`{port}` in `command`), wait until `health` answers, stop it afterwards."""
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # mlflow execs `uvicorn` from PATH
    with open(log, "wb") as output:
        command = [part.format(port=port) for part in command]
        process = subprocess.Popen(command, stdout=output, stderr=output, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + health, process)
        yield url
    except Exception:
        print(log.read_text()[-3000:])
        raise
    finally:
        with suppress(ProcessLookupError):  # stop the server and the uvicorn it may have started
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt")


@pytest.fixture(scope="module")
def service(checkpoint_file: Path) -> Iterator[str]:
    command = [str(BIN / "classifier"), "serve", str(checkpoint_file), "--port", "{port}"]
    command += ["--max-upload-mb", str(MAX_UPLOAD_MB)]
    with running(command, "/health", checkpoint_file.with_name("serve.log")) as url:
        yield url


def test_predict_labels_each_uploaded_file_like_the_model_does(service, checkpoint_file):
    images = {f"case_{index}.png": png(class_image(index % 2, index)) for index in range(3)}

    response = requests.post(f"{service}/predict", files=[("files", (name, data)) for name, data in images.items()])

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = load_classifier(str(checkpoint_file)).predict(list(images.values()))
    assert [prediction["file"] for prediction in predictions] == list(images)
    assert [prediction["label"] for prediction in predictions] == list(expected["label"])
    for prediction, (_, row) in zip(predictions, expected.iterrows(), strict=True):
        assert prediction["probabilities"] == pytest.approx({name: row[f"prob_{name}"] for name in CLASSES})
        assert prediction["confidence"] == pytest.approx(prediction["probabilities"][prediction["label"]])


def float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(buffer, format="TIFF")
    return buffer.getvalue()


def noise_png() -> bytes:
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)))


@pytest.mark.parametrize(
    ("name", "content", "status", "reason"),
    [
        ("notes.png", b"not an image at all", 415, "not an image"),
        ("scan.tif", float_tiff(), 415, "unsupported image mode F"),
        ("huge.png", noise_png(), 413, "upload limit"),
    ],
)
def test_bad_upload_gets_a_4xx_naming_it_and_the_service_keeps_serving(service, name, content, status, reason):
    good = ("good.png", png(class_image(0, 0)))

    response = requests.post(f"{service}/predict", files=[("files", good), ("files", (name, content))])

    assert response.status_code == status
    assert response.json()["file"] == name
    assert name in response.json()["detail"] and reason in response.json()["detail"]
    assert requests.post(f"{service}/predict", files=[("files", good)]).status_code == 200


def test_health_and_openapi_docs(service):
    health = requests.get(f"{service}/health").json()
    assert health["status"] == "ok" and health["classes"] == CLASSES

    schema = requests.get(f"{service}/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"413", "415"} <= set(schema["paths"]["/predict"]["post"]["responses"])
    assert requests.get(f"{service}/docs").status_code == 200


def test_registered_champion_is_served_by_mlflow_and_by_classifier(checkpoint, experiment, tmp_path):
    with mlflow.start_run(experiment_id=experiment):
        info = log_classifier_model(checkpoint, registered_model_name="lesions")
    mlflow.MlflowClient().set_registered_model_alias("lesions", "champion", info.registered_model_version)
    uri = "models:/lesions@champion"
    images = [png(class_image(0, 5)), png(class_image(1, 5))]
    encoded = [base64.b64encode(image).decode("ascii") for image in images]
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))

    mlflow_command = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-p", "{port}"]
    with running(mlflow_command, "/ping", tmp_path / "mlflow-serve.log") as url:
        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[encoded[0]], ["bm90IGFuIGltYWdl"], [encoded[1]]]}
        }
        response = requests.post(f"{url}/invocations", json=payload)
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    assert served.loc[1, "error"].startswith("row 1: not an image")
    readable = served.drop(index=1).reset_index(drop=True)
    assert readable["error"].isna().all()
    pd.testing.assert_frame_equal(readable.drop(columns="error"), expected.drop(columns="error"), check_dtype=False)

    classifier_command = [str(BIN / "classifier"), "serve", uri, "--port", "{port}"]
    with running(classifier_command, "/health", tmp_path / "classifier-serve.log") as url:
        response = requests.post(
            f"{url}/predict", files=[("files", ("a.png", images[0])), ("files", ("b.png", images[1]))]
        )
    assert [prediction["label"] for prediction in response.json()["predictions"]] == list(expected["label"])
