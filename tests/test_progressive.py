"""Progressive resizing: small images first, the prepared size last; a schedule an Optuna search space can tune."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from prepared import prepared_dataset

from classifier.config import TrainConfig, build_config
from classifier.errors import UserError
from classifier.learn.train import fit
from classifier.tune.space import parse_space


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("pair"), {"benign": 16, "malignant": 16})


def config(tmp_path: Path, **options) -> TrainConfig:
    values = dict(epochs=3, batch_size=8, augment="none", system_metrics=False, num_workers=0)
    return TrainConfig(**{**values, "output_dir": tmp_path / "outputs", **options})


def test_training_images_grow_over_the_epochs_and_the_model_keeps_the_prepared_size(pair, tmp_path, monkeypatch):
    seen: list[int] = []
    forward = torch.nn.Conv2d.forward

    def record(self, images):  # the first convolution of each training step sees the scheduled size
        if self.training and self.in_channels == 3:
            seen.append(images.shape[-1])
        return forward(self, images)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", record)
    result = fit(config(tmp_path, progressive_sizes=[8, 12, 16]), pair, log_model=False)
    monkeypatch.undo()

    history = mlflow.tracking.MlflowClient().get_metric_history(result.run_id, "image_size")
    assert [int(point.value) for point in sorted(history, key=lambda point: point.step)] == [8, 12, 16]
    assert sorted(set(seen)) == [8, 12, 16]
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["preprocessing"]["size"] == 16  # inference runs at the prepared size


def test_sizes_beyond_the_prepared_images_are_refused(pair, tmp_path):
    with pytest.raises(UserError, match=r"progressive_sizes \[8, 32\] go beyond the 16 px"):
        fit(config(tmp_path, progressive_sizes=[8, 32]), pair)
    with pytest.raises(UserError, match="'progressive_sizes' must be 1 to 'epochs' \\(3\\)"):
        build_config(TrainConfig, {"epochs": 3, "progressive_sizes": "8,10,12,16"})


def test_a_search_space_can_choose_between_schedules():
    space = parse_space(
        {"progressive_sizes": {"type": "categorical", "choices": ["16", "8,16"]}}, ["progressive_sizes"]
    )
    chosen = space["progressive_sizes"].choices[1]
    assert build_config(TrainConfig, {"progressive_sizes": chosen}).progressive_sizes == [8, 16]
