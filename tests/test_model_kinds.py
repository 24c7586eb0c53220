"""Every command on every model kind: embed, evaluate, predict and serve on a timm, simple_cnn, metadata, multi-label
and ensemble model either work or refuse in one line (never a traceback)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import class_image
from fastapi.testclient import TestClient

from classifier.cli import main
from classifier.config import PrepareConfig, TrainConfig
from classifier.data.prepare import prepare
from classifier.learn.train import fit
from classifier.model.pyfunc import load_classifier
from classifier.nets.ensemble import combine
from classifier.serving.http import create_app

KINDS = ["simple_cnn", "timm", "metadata", "multi_label", "ensemble"]
COMMANDS = ["evaluate", "embed", "predict", "serve"]
# What is refused, and the one line that says why; everything else must work.
REFUSED = {("ensemble", "embed"): "embed: the model is an ensemble of 2 members"}


def write_source(root: Path, multi_label: bool) -> Path:
    """A CSV of 32 small RGB images with age and sex columns; labels lists of classes when `multi_label`."""
    (root / "images").mkdir(parents=True)
    rows = []
    for index in range(32):
        label = index % 2
        class_image(label, index, (16, 16)).save(root / "images" / f"{index:02d}.png")
        names = ["benign", "malignant"]
        rows.append(
            {
                "path": f"images/{index:02d}.png",
                "label": " ".join(names[: 1 + index % 3 // 2]) if multi_label else names[label],
                "age": str(30 + 20 * label + index % 7),
                "sex": ["male", "female"][index % 2],
            }
        )
    pd.DataFrame(rows).to_csv(root / "source.csv", index=False)
    return root / "source.csv"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(checkpoint, prepared data) of each kind, each trained for one epoch."""
    root = tmp_path_factory.mktemp("kinds")
    datasets = {}
    for multi_label in (False, True):
        source = write_source(root / f"source-{multi_label}", multi_label)
        output = root / f"data-{multi_label}"
        prepare(source, output, PrepareConfig(size=16, fractions=[0.5, 0.5, 0.0], multi_label=multi_label, workers=1))
        datasets[multi_label] = output
    quick = dict(epochs=1, batch_size=8, augment="none", system_metrics=False, num_workers=0)
    settings = {
        "simple_cnn": {},
        "timm": {"model": "resnet18"},
        "metadata": {"metadata": ["age", "sex"]},
        "multi_label": {},
    }
    found = {}
    with pytest.MonkeyPatch.context() as patch:  # as the function-scoped isolated_* fixtures do, for the module
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.setenv("CLASSIFIER_CACHE_DIR", str(root / "cache"))
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(name, raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        for kind, options in settings.items():
            config = TrainConfig(**quick, **options, output_dir=root / "outputs", experiment=kind)
            data = datasets[kind == "multi_label"]
            found[kind] = (fit(config, data, log_model=False).checkpoint, data)
        other = fit(TrainConfig(**quick, seed=7, output_dir=root / "outputs"), datasets[False], log_model=False)
    members = [torch.load(path, weights_only=True) for path in (found["simple_cnn"][0], other.checkpoint)]
    ensemble = root / "ensemble.pt"
    torch.save(combine(members, ["a.pt", "b.pt"], {}), ensemble)
    found["ensemble"] = (ensemble, datasets[False])
    return found


def run_command(command: str, checkpoint: Path, data: Path, tmp_path: Path) -> tuple[int, str]:
    """Exit status and output of `command` on the model (serve: one upload through the HTTP app)."""
    if command == "serve":
        try:
            classifier = load_classifier(str(checkpoint))
            client = TestClient(create_app(classifier, str(checkpoint)))
        except Exception as error:  # noqa: BLE001 - what a user of `classifier serve` would see
            return 1, f"{type(error).__name__}: {error}"
        upload = [("files", ("one.png", next((data / "training").rglob("*.png")).read_bytes()))]
        form = {"metadata": json.dumps({"age": 40, "sex": "male"})} if classifier.metadata_columns else {}
        answer = client.post("/predict", files=upload, data=form)
        return (0 if answer.status_code == 200 else 1), answer.text
    arguments = {
        "evaluate": ["evaluate", str(checkpoint), str(data), "--split", "validation", "--bootstrap", "20"],
        "embed": ["embed", str(checkpoint), str(data), "--split", "validation"],
        "predict": ["predict", str(checkpoint), str(data / "manifest.csv"), "-o", str(tmp_path / "predictions.csv")],
    }[command]
    result = CliRunner().invoke(main, arguments)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return 2, "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_command_works_on_each_model_kind_or_refuses_in_one_line(models, kind, command, tmp_path):
    checkpoint, data = models[kind]

    status, output = run_command(command, checkpoint, data, tmp_path)

    assert "Traceback" not in output, output[-3000:]
    refusal = REFUSED.get((kind, command))
    if refusal is None:
        assert status == 0, output[-3000:]
        if command == "predict":
            table = pd.read_csv(tmp_path / "predictions.csv")
            assert len(table) == 32 and table["error"].isna().all()
    else:
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert status == 1 and len(errors) == 1 and refusal in errors[0], output[-3000:]
