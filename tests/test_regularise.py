"""Regularisation options of training: mixup/cutmix, weight EMA, dropout and stochastic depth."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import TrainConfig, build_config
from classifier.errors import UserError
from classifier.learn import train
from classifier.learn.train import Trainer, cpu_state_dict, fit, make_mixup
from classifier.model.checkpoint import network_from_checkpoint, read_checkpoint
from classifier.nets.losses import make_criterion
from classifier.nets.models import create_model
from classifier.tune.space import parse_space


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_dataset(tmp_path_factory.mktemp("three"), {"red": 20, "green": 20, "blue": 20})


def quick(tmp_path: Path, **options) -> TrainConfig:
    values = dict(epochs=2, batch_size=8, lr=3e-3, augment="none", system_metrics=False, num_workers=0)
    return TrainConfig(**{**values, "output_dir": tmp_path / "outputs", **options})


def test_mixed_fit_with_ema_validates_and_keeps_the_ema_weights(
    three_classes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emas, snapshots, batches = [], [], []
    make_ema, mixed = train.make_ema, Trainer._mixed

    def kept(model: torch.nn.Module, decay: float) -> timm.utils.ModelEmaV3:
        emas.append(make_ema(model, decay))
        return emas[-1]

    def snapshot(epoch: int, metrics: dict[str, float]) -> None:
        snapshots.append(cpu_state_dict(emas[0].module))

    def spy(self: Trainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batches.append((labels.clone(), *mixed(self, images, labels)))
        return batches[-1][1:]

    monkeypatch.setattr(train, "make_ema", kept)
    monkeypatch.setattr(Trainer, "_mixed", spy)
    config = quick(tmp_path, epochs=3, batch_size=7, mixup_alpha=0.4, cutmix_alpha=1.0, ema_decay=0.9, augment="xray")

    result = fit(config, three_classes, log_model=False, on_epoch_end=snapshot)

    assert result.best_metrics["val_accuracy"] > 0.5  # chance is 1/3
    # every batch (36 images in batches of 7, 7, 7, 7, 7, 1: all odd) trains on class probabilities of mixed images
    assert len(batches) == 3 * 6 and all(len(labels) % 2 == 1 for labels, _, _ in batches)
    for labels, images, targets in batches:
        assert images.shape[0] == targets.shape[0] == len(labels)
        assert torch.allclose(targets.sum(1), torch.ones(len(labels)))
        assert torch.equal(targets[-1], torch.eye(3)[labels[-1]])  # the odd one out stays as it is
    assert any((targets.max(1).values < 0.99).any() for _, _, targets in batches)
    # the best checkpoint holds the EMA weights of its epoch; last.pt those of the last epoch and the trained ones
    best = torch.load(result.checkpoint, weights_only=True)
    last = torch.load(result.checkpoint.with_name("last.pt"), weights_only=True)
    assert same(best["state_dict"], snapshots[result.best_epoch - 1]) and "model_state_dict" not in best
    assert same(last["state_dict"], snapshots[-1]) and last["ema_steps"] == 3 * 6
    trained = last["model_state_dict"]
    assert any(not torch.equal(tensor, trained[name]) for name, tensor in snapshots[-1].items() if "weight" in name)


def same(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return set(state) == set(other) and all(torch.equal(tensor, other[name]) for name, tensor in state.items())


def test_killed_run_with_ema_and_mixup_resumes_as_if_never_stopped(three_classes: Path, tmp_path: Path) -> None:
    options = dict(epochs=3, mixup_alpha=0.4, cutmix_alpha=1.0, mixup_prob=0.8, ema_decay=0.9)
    uninterrupted = fit(quick(tmp_path, **options), three_classes, log_model=False)

    def kill_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    other = quick(tmp_path, experiment="again", **options)
    with pytest.raises(KeyboardInterrupt):
        fit(other, three_classes, on_epoch_end=kill_after_first_epoch, log_model=False)
    resumed = fit(other, three_classes, log_model=False)

    assert resumed.best_metrics == uninterrupted.best_metrics
    final = [torch.load(run.checkpoint.with_name("last.pt"), weights_only=True) for run in (uninterrupted, resumed)]
    assert final[0]["ema_steps"] == final[1]["ema_steps"]
    assert same(final[0]["state_dict"], final[1]["state_dict"])  # the EMA weights
    assert same(final[0]["model_state_dict"], final[1]["model_state_dict"])


def test_ema_follows_the_model_while_the_backbone_is_frozen(three_classes: Path, tmp_path: Path) -> None:
    stages = []

    def snapshot(epoch: int, metrics: dict[str, float]) -> None:
        stages.append(torch.load(next((tmp_path / "outputs").glob("*/last.pt")), weights_only=True))

    fit(quick(tmp_path, freeze_epochs=1, ema_decay=0.9), three_classes, on_epoch_end=snapshot, log_model=False)

    assert same(stages[0]["state_dict"], stages[0]["model_state_dict"]) and stages[0]["ema_steps"] == 0
    assert not same(stages[1]["state_dict"], stages[1]["model_state_dict"]) and stages[1]["ema_steps"] == 5


def test_rates_reach_the_timm_model_and_inference_rebuilds_it(three_classes: Path, tmp_path: Path) -> None:
    network = create_model("resnet18", 3, 3, drop_rate=0.3, drop_path_rate=0.2)
    rates = [module.drop_prob for module in network.modules() if isinstance(module, timm.layers.DropPath)]
    assert network.drop_rate == 0.3 and max(rates) == pytest.approx(0.2)  # timm raises it block by block
    assert create_model("simple_cnn", 3, 3, drop_rate=0.5).classifier[0].p == 0.5

    config = quick(tmp_path, model="resnet18", epochs=1, drop_rate=0.3, drop_path_rate=0.2)
    result = fit(config, three_classes, log_model=False)

    checkpoint = read_checkpoint(result.checkpoint)
    rebuilt = network_from_checkpoint(checkpoint)  # without the rates: they only act in training
    trained = create_model("resnet18", 3, 3, drop_rate=0.3, drop_path_rate=0.2)
    trained.load_state_dict(checkpoint["state_dict"])
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), trained.eval()(images))
    assert mlflow.MlflowClient().get_run(result.run_id).data.params["drop_path_rate"] == "0.2"


def test_models_without_a_rate_refuse_it_in_one_line() -> None:
    with pytest.raises(UserError, match="option 'drop_path_rate' needs a timm model with residual blocks") as error:
        create_model("simple_cnn", 2, 1, drop_path_rate=0.1)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="option 'drop_path_rate' is not one model 'vgg11' takes"):
        create_model("vgg11", 2, 1, drop_path_rate=0.1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mixup-alpha", "-1"], "option 'mixup_alpha' must be >= 0"),
        (["--cutmix-alpha", "-0.5"], "option 'cutmix_alpha' must be >= 0"),
        (["--mixup-prob", "1.5"], "option 'mixup_prob' must be in [0, 1]"),
        (["--ema-decay", "1"], "option 'ema_decay' must be in (0, 1)"),
        (["--ema-decay", "0"], "option 'ema_decay' must be in (0, 1)"),
        (["--drop-rate", "1"], "option 'drop_rate' must be in [0, 1)"),
        (["--drop-path-rate", "-0.1"], "option 'drop_path_rate' must be in [0, 1)"),
        (["--drop-path-rate", "0.1"], "option 'drop_path_rate' needs a timm model"),
    ],
)
def test_bad_regularisation_fails_in_one_line_and_logs_nothing(
    three_classes: Path, tmp_path: Path, arguments: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["train", str(three_classes), "--output-dir", str(tmp_path), *arguments])

    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_mixing_is_refused_where_it_would_mix_wrongly() -> None:
    with pytest.raises(UserError, match="'mixup_alpha'/'cutmix_alpha' mix images only"):
        build_config(TrainConfig, {"cutmix_alpha": 1.0, "metadata": ["age"]})
    with pytest.raises(UserError, match="'mixup_alpha'/'cutmix_alpha' need single-label data"):
        make_mixup(TrainConfig(mixup_alpha=0.2), 3, multi_label=True)
    assert make_mixup(TrainConfig(mixup_alpha=0.2, mixup_prob=0.0), 3, multi_label=True) is None


def test_a_search_space_tunes_the_regularisation() -> None:
    space = {
        "mixup_alpha": {"type": "float", "low": 0.0, "high": 0.4},
        "cutmix_alpha": {"type": "categorical", "choices": [0.0, 1.0]},
        "ema_decay": {"type": "categorical", "choices": [None, 0.99, 0.999]},
        "drop_path_rate": {"type": "float", "low": 0.0, "high": 0.2},
        "augment": {"type": "categorical", "choices": ["light", "xray"]},
    }

    assert set(parse_space(space, TrainConfig.__dataclass_fields__)) == set(space)
    config = build_config(TrainConfig, {"model": "resnet18", "mixup_alpha": 0.3, "ema_decay": 0.99, "augment": "xray"})
    assert (config.mixup_alpha, config.ema_decay, config.augment) == (0.3, 0.99, "xray")


@pytest.mark.parametrize(("loss", "weighted"), [("cross_entropy", False), ("focal", False), ("focal", True)])
def test_losses_take_class_probabilities_as_they_take_classes(loss: str, weighted: bool) -> None:
    criterion = make_criterion(loss, np.array([10, 30, 5]), weighted, 0.1, 2.0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])

    one_hot = torch.eye(3)[labels]
    assert criterion(logits, one_hot).item() == pytest.approx(criterion(logits, labels).item(), rel=1e-5)
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    assert criterion(logits, mixed).item() > 0
