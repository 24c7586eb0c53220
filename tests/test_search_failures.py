"""A trial that fails because of its configuration (out of memory, a model that refuses the image size) ends FAILED,
with its reason in Optuna and MLflow, and the study goes on; a study whose every trial fails stops with one line."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier import tracking
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.errors import UserError
from classifier.nets.models import SimpleCNN
from classifier.tune.search import FAILURE_ATTR, search
from classifier.tune.storage import open_storage

TINY_TRAIN = {"epochs": 1, "batch_size": 8, "model": "simple_cnn", "system_metrics": False, "num_workers": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    counts = {"benign": 12, "malignant": 12}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


def run(tmp_path: Path, dataset: Path, space: dict, enqueued: list[dict], n_trials: int) -> optuna.Study:
    known = tmp_path / "enqueue.yaml"
    known.write_text(yaml.safe_dump(enqueued))
    options = {"study_name": "s", "n_trials": n_trials, "pruner": "none", "space": space, "enqueue": str(known)}
    search(build_config(SearchConfig, options), build_config(TrainConfig, TINY_TRAIN), dataset)
    return optuna.load_study(study_name="s", storage=open_storage(None))


def failure_tags(study: optuna.Study) -> list[str]:
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("classifier").experiment_id], "tags.optuna_study = 's'")
    return [run.data.tags[tracking.FAILURE_TAG] for run in runs if run.info.status == "FAILED"]


def test_a_model_that_refuses_the_image_size_fails_its_trial_not_the_study(tmp_path, dataset):
    space = {"model": {"type": "categorical", "choices": ["vit_tiny_patch16_224", "simple_cnn"]}}
    study = run(tmp_path, dataset, space, [{"model": "vit_tiny_patch16_224"}, {"model": "simple_cnn"}], n_trials=2)

    failed, done = study.trials
    assert (failed.state, done.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert "doesn't match model" in failed.user_attrs[FAILURE_ATTR]  # timm's ViT wants 224 px
    assert failure_tags(study) == [failed.user_attrs[FAILURE_ATTR]]


def test_an_out_of_memory_trial_fails_and_the_next_one_runs(tmp_path, dataset, monkeypatch):
    forward = SimpleCNN.forward

    def out_of_memory_above_8_images(self, images):
        if self.training and len(images) > 8:  # the 12 training images in one batch of 16
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, images)

    monkeypatch.setattr(SimpleCNN, "forward", out_of_memory_above_8_images)
    space = {"batch_size": {"type": "categorical", "choices": [8, 16]}}
    study = run(tmp_path, dataset, space, [{"batch_size": 16}, {"batch_size": 8}], n_trials=2)

    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "out of memory" in study.trials[0].user_attrs[FAILURE_ATTR]
    assert len(failure_tags(study)) == 1 and "out of memory" in failure_tags(study)[0]


def test_a_study_whose_every_trial_fails_stops_with_one_line(tmp_path, dataset, monkeypatch):
    def broken(self, images):
        raise RuntimeError("a bug in the network")

    monkeypatch.setattr(SimpleCNN, "forward", broken)
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    with pytest.raises(UserError, match="the first 3 trials all failed, the last with RuntimeError: a bug in the net"):
        run(tmp_path, dataset, space, [], n_trials=5)
    assert [trial.state for trial in optuna.load_study(study_name="s", storage=open_storage(None)).trials] == [
        TrialState.FAIL
    ] * 3
