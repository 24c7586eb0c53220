"""`classifier ensemble`: the averaged probabilities of a study's top trials as one logged, registrable model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from PIL import Image
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import EnsembleConfig, EvaluateConfig, SearchConfig, TrainConfig
from classifier.data.dataset import load_split
from classifier.data.transforms import Normalise, image_to_tensor
from classifier.evaluation.evaluate import evaluate
from classifier.measure.metrics import classification_metrics
from classifier.measure.threshold import choose_threshold
from classifier.model.checkpoint import read_checkpoint
from classifier.nets.ensemble import Ensemble
from classifier.nets.models import create_model, model_from_checkpoint
from classifier.tune.ensemble import build_ensemble
from classifier.tune.search import search

CLASSES = ["benign", "malignant"]
PROBABILITIES = [f"prob_{name}" for name in CLASSES]


@pytest.fixture(scope="module")
def data32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 32 px dataset matching conftest's `write_checkpoint` members (untrained simple_cnn)."""
    return prepared_dataset(tmp_path_factory.mktemp("data32"), {"benign": 8, "malignant": 8}, size=32)


def softmax_of(network: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return network(batch).softmax(dim=1).numpy()


def test_ensemble_softmax_is_the_mean_of_member_softmaxes() -> None:
    torch.manual_seed(0)
    members = [create_model("simple_cnn", 3, 3).eval() for _ in range(3)]
    members[1].classifier[1].weight.data.mul_(25)  # one confident member: averaging probabilities, not logits
    batch = torch.randn(5, 3, 16, 16)

    averaged = softmax_of(Ensemble(members).eval(), batch)

    np.testing.assert_allclose(averaged, np.mean([softmax_of(member, batch) for member in members], axis=0), atol=1e-6)


def test_study_ensemble_is_scored_beside_its_members_logged_and_registered(tmp_path: Path) -> None:
    data = prepared_dataset(tmp_path, {"benign": 15, "malignant": 15})
    journal = str(tmp_path / "optuna.journal")
    train = TrainConfig(
        epochs=1, batch_size=8, augment="none", system_metrics=False, output_dir=tmp_path / "out", num_workers=0
    )
    space = {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
    search(SearchConfig(study_name="s", storage=journal, n_trials=3, pruner="none", space=space), train, data)
    study = optuna.load_study(
        study_name="s", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    )
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(study.trials, key=lambda trial: trial.value, reverse=maximise)
    run_ids = [trial.user_attrs["mlflow_run_id"] for trial in ranked]

    result = build_ensemble(EnsembleConfig(study="s", storage=journal, register_as="tumour-ensemble"), data)

    # Members: the 3 completed trials, best first; the ensemble's scores are those of the averaged probabilities.
    assert list(result.table["model"]) == ["ensemble", "member0", "member1", "member2"]
    assert list(result.table["source"])[1:] == run_ids
    assert list(result.table["trial"])[1:] == [str(trial.number) for trial in ranked]
    # A search keeps no local trial folders: each member's weights are those of the model its run logged.
    assert not any((tmp_path / "out" / run_id).exists() for run_id in run_ids)
    checkpoints = [
        read_checkpoint(next(Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")).rglob("*.pt")))
        for run_id in run_ids
    ]
    networks = [model_from_checkpoint(checkpoint) for checkpoint in checkpoints]
    preprocessing = checkpoints[0]["preprocessing"]
    normalise = Normalise(preprocessing["mean"], preprocessing["std"])
    test = load_split(data, "test")
    members = [softmax_of(network, normalise(torch.from_numpy(test.images))) for network in networks]
    expected = classification_metrics(test.labels, np.mean(members, axis=0), CLASSES, result.threshold)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["ensemble_accuracy"] == pytest.approx(expected["accuracy"])
    assert run.data.metrics["ensemble_roc_auc"] == pytest.approx(expected["roc_auc"])
    for index, member in enumerate(members):
        scores = classification_metrics(test.labels, member, CLASSES, checkpoints[index]["threshold"])
        assert run.data.metrics[f"member{index}_macro_f1"] == pytest.approx(scores["macro_f1"])
        assert run.data.params[f"member{index}"] == run_ids[index]
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/comparison.csv", "evaluation/confusion_matrix.png", "evaluation/roc_curve.png"} <= artifacts

    # The threshold is chosen on validation from the averaged probabilities, as training chooses its own.
    validation = load_split(data, "validation")
    averaged = np.mean([softmax_of(net, normalise(torch.from_numpy(validation.images))) for net in networks], axis=0)
    assert result.threshold == pytest.approx(choose_threshold(validation.labels == 1, averaged[:, 1]))
    assert run.data.metrics["decision_threshold"] == pytest.approx(result.threshold)

    # The logged model: raw image bytes in, the Ensemble network's probabilities out; registered as a version.
    images = [(data / path).read_bytes() for path in test.paths]
    predictions = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": images}))
    batch = normalise(torch.stack([image_to_tensor(Image.open(data / path), 8) for path in test.paths]))
    ensemble = softmax_of(Ensemble(networks).eval(), batch)
    np.testing.assert_allclose(predictions[PROBABILITIES].to_numpy(), ensemble, atol=1e-5)
    np.testing.assert_allclose(ensemble, np.mean([softmax_of(net, batch) for net in networks], axis=0), atol=1e-6)
    positive = predictions["prob_malignant"] >= result.threshold
    assert list(predictions["label"]) == [CLASSES[int(flag)] for flag in positive]
    version = mlflow.MlflowClient().get_model_version("tumour-ensemble", result.registered_version)
    assert version.run_id == result.run_id
    evaluated = evaluate(EvaluateConfig(bootstrap=0), result.model_uri, data).metrics
    assert evaluated == pytest.approx(expected, abs=1e-6, nan_ok=True)  # ECE sums float32 differences

    # The command line: given runs, a table of the ensemble and each member, and the model's URI.
    output = CliRunner().invoke(main, ["ensemble", str(data), "--runs", ",".join(run_ids[:2]), "--split", "validation"])
    assert output.exit_code == 0, output.output
    lines = output.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "source", "architecture", "accuracy"]
    assert [line.split()[0] for line in lines[1:4]] == ["ensemble", "member0", "member1"]
    assert "model models:/" in lines[4]


def test_a_study_with_fewer_completed_trials_than_top_k_uses_them_all(tmp_path: Path, data32: Path) -> None:
    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(
        study_name="small", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    )
    for index, value in enumerate((0.3, 0.2, None)):  # val_loss, minimised: trial 1, then 0; trial 2 failed
        member = {"mlflow_run_id": str(write_checkpoint(tmp_path / f"member{index}.pt"))}
        state = optuna.trial.TrialState.FAIL if value is None else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(value=value, state=state, user_attrs=member))

    output = CliRunner().invoke(main, ["ensemble", str(data32), "--study", "small", "--storage", journal])

    assert output.exit_code == 0, output.output
    assert "has 2 completed trials, fewer than --top-k 3; using them all" in output.output
    lines = output.stdout.splitlines()
    members = [line.split()[:2] for line in lines[2:4]]
    assert members == [["member0", str(tmp_path / "member1.pt")], ["member1", str(tmp_path / "member0.pt")]]
    assert lines[4].startswith("run ")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([{}], "needs at least 2 members, got 1 in --runs"),
        ([{}, {"classes": ("benign", "cyst")}], "differ in classes (['benign', 'malignant'] vs ['benign', 'cyst'])"),
        ([{}, {"size": 16}], "differ in size (32 vs 16); ensemble models trained on the same prepared data"),
    ],
)
def test_bad_members_are_one_line_errors(tmp_path: Path, data32: Path, members: list[dict], message: str) -> None:
    paths = [str(write_checkpoint(tmp_path / f"m{index}.pt", **member)) for index, member in enumerate(members)]

    output = CliRunner().invoke(main, ["ensemble", str(data32), "--runs", ",".join(paths)])

    assert output.exit_code == 1
    assert message in output.output
    assert len(output.output.strip().splitlines()) == 1


def test_runs_without_checkpoints_and_missing_studies_are_refused(tmp_path: Path, data32: Path, experiment) -> None:
    with mlflow.start_run(experiment_id=experiment) as empty:
        pass
    member = str(write_checkpoint(tmp_path / "member.pt"))
    journal = str(tmp_path / "optuna.journal")
    optuna.create_study(
        study_name="one", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    ).add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"mlflow_run_id": member}))
    cases = {
        (f"--runs={empty.info.run_id},{member}",): f"run {empty.info.run_id} has no checkpoints/best.pt nor model",
        ("--study=one", f"--storage={journal}"): "--study one: 1 completed trial(s); an ensemble needs at least 2",
        ("--study=two", f"--storage={journal}"): "--study two: no such study in that storage (studies: one)",
        ("--study=one", f"--storage={tmp_path / 'none.journal'}"): "no Optuna journal there",
        ("--study=one", "--runs=a,b"): "pass either --study NAME",
    }
    for args, message in cases.items():
        output = CliRunner().invoke(main, ["ensemble", str(data32), *args])
        assert output.exit_code == 1, output.output
        assert message in output.output
