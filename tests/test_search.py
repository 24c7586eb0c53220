"""`classifier search` inputs: the search space, storage URLs, study reuse; each bad input is one line, exit 1."""

from __future__ import annotations

import logging
import time
import types
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest import TRACKING_STORE, tracked_nothing
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier import tracking
from classifier.cli import main
from classifier.config import SearchConfig, TrainConfig, build_config
from classifier.errors import UserError
from classifier.learn.train import resolve_monitor
from classifier.tune.search import SKIPPED_ATTR, Objective, open_study, trial_counts
from classifier.tune.space import parse_space, suggest
from classifier.tune.storage import JOURNAL_FILE, default_storage, open_storage

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
    assert not (tmp_path / JOURNAL_FILE).exists() and tracked_nothing()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-trials", "0"], "'n_trials' must be >= 1"),
        (["--storage", "redis://localhost:6379"], "unknown scheme 'redis'"),
        (["--n-workers", "2", "--storage", "sqlite:///optuna.db"], "does not support parallel workers"),
        (["--objective", "val_bogus"], "--objective val_bogus: not a metric training logs on this data; use one of"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, dataset, args, message):
    result = run_search(tmp_path, dataset, {}, *args)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / JOURNAL_FILE).exists() and tracked_nothing()


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
    result = run_search(tmp_path, dataset, {"study_name": "s"}, "--objective", "val_accuracy")
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


@pytest.mark.parametrize(
    ("enqueued", "message"),
    [
        ([{"lr": 0.5}], "trial 1: lr=0.5 lies outside the search space"),
        ([{"lr": 0.003}, {"momentum": 0.9}], "trial 2 sets 'momentum', which the search space does not tune"),
        ({"lr": 0.003}, "expected a YAML list of {parameter: value} mappings"),
    ],
)
def test_bad_enqueue_file_is_one_line_error_and_runs_nothing(tmp_path, dataset, enqueued, message):
    known_good = tmp_path / "known-good.yaml"
    known_good.write_text(yaml.safe_dump(enqueued))
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    result = run_search(tmp_path, dataset, {"space": space, "n_trials": 1}, "--enqueue", str(known_good))
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / JOURNAL_FILE).exists()


def test_enqueued_configurations_are_the_first_trials_once_then_the_gp_sampler_takes_over(tmp_path, dataset):
    known_good = tmp_path / "known-good.yaml"
    known_good.write_text(yaml.safe_dump([{"lr": 0.004, "batch_size": 8}, {"lr": 0.0002, "batch_size": 16}]))
    space = {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [8, 16]},
    }
    search = {"space": space, "n_trials": 3, "study_name": "warm", "sampler": "gp", "pruner": "none"}
    args = ["--enqueue", str(known_good), "--storage", str(tmp_path / "warm.journal")]
    assert run_search(tmp_path, dataset, search, *args).exit_code == 0
    assert run_search(tmp_path, dataset, {**search, "n_trials": 4}, *args).exit_code == 0  # resumed: not enqueued again

    study = optuna.load_study(study_name="warm", storage=open_storage(str(tmp_path / "warm.journal")))
    trials = sorted(study.trials, key=lambda trial: trial.number)
    assert [trial.params for trial in trials[:2]] == [{"lr": 0.004, "batch_size": 8}, {"lr": 0.0002, "batch_size": 16}]
    assert len(trials) == 4 and all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert {"lr": 0.004, "batch_size": 8} not in [trial.params for trial in trials[2:]]


def test_a_trial_past_the_total_ends_unrun_and_counts_as_skipped_not_failed():
    """Two workers can claim the study's last place at once: the trial created later is skipped."""
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})  # a retry waiting to run: it keeps its place ahead of later trials
    running = study.ask()  # the waiting retry, now running
    study.tell(study.ask(), 1.0)  # trial 1 done: with the retry, the study's 2 trials are claimed
    job = types.SimpleNamespace(search=types.SimpleNamespace(trial_limit=2))
    objective = Objective(job, {})
    ran = []

    def surplus(trial: optuna.Trial) -> float:
        objective.skip_if_full(trial)
        ran.append(trial.number)
        return 0.0

    warnings = Messages()
    logging.getLogger("optuna").addHandler(warnings)  # Optuna's loggers do not propagate to the root
    try:
        study.optimize(surplus, n_trials=1, catch=(Exception,))
    finally:
        logging.getLogger("optuna").removeHandler(warnings)

    assert ran == [] and study.trials[2].state == TrialState.FAIL and study.trials[2].user_attrs[SKIPPED_ATTR]
    assert trial_counts(study)["skipped"] == 1 and trial_counts(study)["fail"] == 0
    assert not [message for message in warnings.messages if "Trial 2" in message]  # no failure warning for it
    objective.skip_if_full(running)  # the retry itself, created before trial 1, runs


class Messages(logging.Handler):
    """Collects the messages of the records it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_finished_trials_leave_one_copy_of_their_weights_in_mlflow_and_no_local_folder_unless_kept(
    tmp_path, dataset, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    outputs = tmp_path / "outputs"
    config = tmp_path / "experiment.yaml"
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    search = {"space": space, "n_trials": 2, "pruner": "none"}
    train = {"epochs": 1, "output_dir": str(outputs), "system_metrics": True, "checkpoint_upload_minutes": 1e-6}
    config.write_text(yaml.safe_dump({"train": train, "search": search}))

    def trial_runs(study_name: str, *args: str) -> set[str]:
        command = ["search", str(dataset), "--config", str(config), "--study-name", study_name, *args]
        assert CliRunner().invoke(main, command).exit_code == 0
        study = optuna.load_study(study_name=study_name, storage=open_storage(str(tmp_path / JOURNAL_FILE)))
        return {trial.user_attrs["mlflow_run_id"] for trial in study.trials}

    lean = trial_runs("lean")
    assert [path.name for path in outputs.iterdir() if path.is_dir()] == []
    client = mlflow.MlflowClient()
    for run_id in lean:  # uploaded while training (resumable elsewhere), gone once the model is logged
        assert client.list_artifacts(run_id, "checkpoints") == []
        run = client.get_run(run_id)
        found = f"source_run_id = '{run_id}'"
        assert len(mlflow.search_logged_models([run.info.experiment_id], found, output_format="list")) == 1
        assert not [key for key in client.get_run(run_id).data.metrics if key.startswith("system/")]
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("classifier").experiment_id],
        "tags.optuna_study = 'lean' and tags.search_metric = 'val_log_loss'",
    )
    assert any(key.startswith("system/cpu_utilization") for key in parent.data.metrics)  # sampled once, for the study
    kept = trial_runs("kept", "--keep-outputs")
    assert {path.name for path in outputs.iterdir() if path.is_dir()} == kept


def test_the_study_runs_system_metrics_never_race_the_logging_of_its_trials(tmp_path, monkeypatch):
    """Trials run in the launcher beside the parent run's system-metrics thread: each trial's run end must not shut
    down a logging queue that thread writes through (it failed trials with "cannot schedule new futures")."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.001")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    failures: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: failures.append(record.getMessage())
    logger = logging.getLogger("mlflow.system_metrics")
    logger.addHandler(handler)
    try:
        tracking.connect()
        with tracking.start_run("race", "search race", system_metrics=True) as parent:
            for trial in range(100):
                with tracking.start_run("race", f"trial-{trial}", parent_run_id=parent.info.run_id):
                    for step in range(3):
                        tracking.log_metrics({"val_loss": 1.0 / (step + 1)}, step=step)
    finally:
        logger.removeHandler(handler)
    assert failures == []
    (run,) = mlflow.MlflowClient().search_runs([tracking.experiment_id("race")], "attributes.run_name = 'trial-99'")
    assert run.data.metrics["val_loss"] == pytest.approx(1 / 3)


def test_auto_workers_are_one_per_visible_gpu_else_one_per_thread_share(monkeypatch):
    import classifier.tune.search as search_module

    monkeypatch.setattr(search_module.processes, "available_cores", lambda: 16)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(search_module.torch.cuda, "device_count", lambda: 0)
    assert search_module.worker_count(SearchConfig(n_workers="auto")) == 8
    assert search_module.worker_count(SearchConfig(n_workers="auto", threads_per_worker=4)) == 4
    assert search_module.worker_count(SearchConfig(n_workers=3)) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert search_module.worker_count(SearchConfig(n_workers="auto")) == 2
    with pytest.raises(UserError, match="'n_workers' must be a number or auto"):
        build_config(SearchConfig, {"n_workers": "many"})


def test_an_option_given_on_the_command_line_is_fixed_for_the_study_not_searched(tmp_path, monkeypatch):
    import classifier.tune.search as search_module

    seen = {}

    def capture(config, train, data):
        seen.update(config=config, train=train)
        return search_module.SearchResult("s", "val_log_loss", None, {}, {}, "run", None)

    monkeypatch.setattr(search_module, "search", capture)
    space = {
        "model": {"type": "categorical", "choices": ["simple_cnn", "resnet18"]},
        "epochs": {"type": "int", "low": 2, "high": 9},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    }
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"search": {"space": space}}))

    result = CliRunner().invoke(main, ["search", str(tmp_path), "--config", str(config), "--model", "simple_cnn"])

    assert result.exit_code == 0, result.output
    assert set(seen["config"].space) == {"epochs", "lr"}  # only --model was given
    assert seen["train"].model == "simple_cnn"


@pytest.mark.slow
def test_parallel_workers_track_where_their_launcher_does_now(tmp_path, dataset, monkeypatch):
    # Workers fork from a server process that outlives one search (a notebook, a test session): they must take the
    # launcher's environment as it is when they start, not the one the server started with.
    import classifier.tune.search as search_module

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    search_module.worker_context()  # the fork server runs, started in another tracking environment (or earlier)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / TRACKING_STORE}")
    space = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    search = {"space": space, "n_trials": 2, "n_workers": 2, "threads_per_worker": 1, "pruner": "none"}

    result = run_search(tmp_path, dataset, {**search, "study_name": "forked"})

    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / TRACKING_STORE}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(run.info.run_name for run in runs if run.info.run_name.startswith("trial-")) == ["trial-0", "trial-1"]
    assert not (tmp_path / "elsewhere.db").exists()
