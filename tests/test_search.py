"""`classifier search` inputs: the search space, storage URLs, study reuse; each bad input is one line, exit 1."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from prepared import prepared_dataset

from classifier.cli import main
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.errors import UserError
from classifier.search import open_study
from classifier.search_space import parse_space, suggest
from classifier.search_storage import JOURNAL_FILE, default_storage, open_storage
from classifier.train import resolve_monitor

TRAIN_OPTIONS = [field for field in TrainConfig.__dataclass_fields__]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared two-class dataset (16 px, half training, half validation), shared by this module's tests."""
    counts = {"benign": 12, "malignant": 12}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


def run_search(tmp_path: Path, dataset: Path, search: dict, *args: str):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 1}, "search": search}))
    return CliRunner().invoke(main, ["search", str(dataset), "--config", str(config), *args])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"type": "uniformish", "low": 0.1, "high": 1}}, "search.space.lr: unknown distribution 'uniformish'"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "search.space.lr: low (0.1) is greater than high"),
        ({"batch_size": {"type": "int", "low": 64, "high": 8}}, "search.space.batch_size: low (64) is greater"),
        ({"augment": {"type": "categorical", "choices": []}}, "search.space.augment: 'choices' must be a non-empty"),
        ({"batchsize": {"type": "int", "low": 8, "high": 16}}, "did you mean batch_size"),
        ({"lr": {"type": "float", "low": 0.1}}, "search.space.lr: missing 'high'"),
        ({"lr": 0.01}, "search.space.lr: expected a mapping"),
    ],
)
def test_malformed_space_is_one_line_error_and_writes_nothing(tmp_path, dataset, space, message):
    result = run_search(tmp_path, dataset, {"space": space, "n_trials": 1})
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / JOURNAL_FILE).exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-trials", "0"], "'n_trials' must be >= 1"),
        (["--storage", "redis://localhost:6379"], "unknown scheme 'redis'"),
        (["--n-workers", "2", "--storage", "sqlite:///optuna.db"], "does not support parallel workers"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, dataset, args, message):
    result = run_search(tmp_path, dataset, {}, *args)
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / JOURNAL_FILE).exists()


def test_unreachable_database_fails_fast(tmp_path, dataset):
    started = time.monotonic()
    result = run_search(tmp_path, dataset, {}, "--storage", "postgresql://postgres:secret@127.0.0.1:9/optuna")
    assert result.exit_code == 1
    assert "cannot open the study database" in result.output and "Connection refused" in result.output
    assert "secret" not in result.output
    assert time.monotonic() - started < 15


def test_study_reused_with_another_metric_is_refused(tmp_path, dataset):
    config = build_config(SearchConfig, {"study_name": "s"})
    open_study(config, "s", "val_loss", maximize=False)
    result = run_search(tmp_path, dataset, {"study_name": "s"}, "--metric", "val_accuracy")
    assert result.exit_code == 1
    assert "optimises val_loss (minimize), not val_accuracy (maximize)" in result.output


def test_default_storage_is_a_journal_beside_the_mlflow_store(tmp_path):
    assert default_storage() == str(tmp_path / JOURNAL_FILE)
    assert isinstance(open_storage(None), optuna.storages.JournalStorage)


def test_auto_metric_follows_fits_monitor():
    assert resolve_monitor("auto", 2) == "val_roc_auc"
    assert resolve_monitor("auto", 7) == "val_macro_f1"
    assert resolve_monitor("val_loss", 2) == "val_loss"


def test_space_suggests_within_declared_bounds():
    space = {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
        "model": {"type": "categorical", "choices": ["simple_cnn", "resnet18"]},
    }
    distributions = parse_space(space, TRAIN_OPTIONS)
    assert distributions["lr"].log and distributions["epochs"].step == 2
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(study.ask(), distributions)
        assert 1e-4 <= values["lr"] <= 1e-1
        assert values["epochs"] in (2, 4, 6, 8)
        assert values["model"] in ("simple_cnn", "resnet18")


def test_yaml_scientific_notation_without_dot_is_read_as_a_number():
    # PyYAML reads `1e-4` as a string; the space must still be a float range.
    space = yaml.safe_load("lr: {type: float, low: 1e-4, high: 1e-2, log: true}")
    assert parse_space(space, TRAIN_OPTIONS)["lr"].low == pytest.approx(1e-4)


def test_default_space_is_valid_for_train_config():
    assert set(parse_space(SearchConfig().space, TRAIN_OPTIONS)) <= set(TRAIN_OPTIONS)


def test_unknown_parameter_suggests_close_names():
    with pytest.raises(UserError, match="did you mean weight_decay"):
        parse_space({"weight_decy": {"type": "float", "low": 0, "high": 1}}, TRAIN_OPTIONS)
