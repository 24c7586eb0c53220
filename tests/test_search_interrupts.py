"""Nothing stuck on the default journal storage: dead workers' trials are failed and retried from their checkpoints,
one Ctrl-C (or SIGTERM) stops a study cleanly, a second forces; real `classifier search` processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from conftest import metric_steps, wait_for
from optuna.trial import TrialState
from prepared import prepared_dataset

from classifier.tune.storage import JOURNAL_FILE, open_storage

pytestmark = pytest.mark.slow

CLASSIFIER = str(Path(sys.executable).with_name("classifier"))
TINY_TRAIN = {"batch_size": 8, "model": "simple_cnn", "system_metrics": False, "num_workers": 0, "augment": "none"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    counts = {"benign": 16, "malignant": 16}
    return prepared_dataset(tmp_path_factory.mktemp("dataset"), counts, fractions=(0.5, 0.5, 0.0))


def search_command(tmp_path: Path, dataset: Path, n_trials: int, n_workers: int, epochs: int) -> list[str]:
    config = tmp_path / "experiment.yaml"
    search = {"study_name": "s", "n_trials": n_trials, "n_workers": n_workers, "pruner": "none"}
    search |= {"threads_per_worker": 1, "space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
    config.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "epochs": epochs}, "search": search}))
    return [CLASSIFIER, "search", str(dataset), "--config", str(config)]


def trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as the journal holds them now (none before the launcher made the study)."""
    if not (tmp_path / JOURNAL_FILE).is_file():
        return []
    try:
        return optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / JOURNAL_FILE))).trials
    except KeyError:  # the study is not created yet
        return []


def training(tmp_path: Path, count: int) -> list[optuna.trial.FrozenTrial]:
    """Trials running with at least one epoch reported, once there are `count` of them (else [])."""
    running = [t for t in trials(tmp_path) if t.state == TrialState.RUNNING and t.intermediate_values]
    return running if len(running) >= count else []


def runs() -> list[mlflow.entities.Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def assert_nothing_running(tmp_path: Path) -> None:
    assert [t.number for t in trials(tmp_path) if t.state == TrialState.RUNNING] == []
    assert [(run.info.run_name, run.info.status) for run in runs() if run.info.status == "RUNNING"] == []


def start(command: list[str], tmp_path: Path) -> subprocess.Popen:
    """The search in a process group of its own, as a terminal runs it (killpg: Ctrl-C reaches every process)."""
    log = open(tmp_path / "search.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log(tmp_path: Path) -> str:
    """What the search processes printed."""
    return (tmp_path / "search.log").read_text(errors="replace")


def test_a_sigkilled_worker_trial_fails_is_retried_from_its_checkpoint_and_the_study_completes(tmp_path, dataset):
    command = search_command(tmp_path, dataset, n_trials=3, n_workers=2, epochs=8)
    launcher = start(command, tmp_path)
    wait_for(lambda: training(tmp_path, 1), 300, launcher, "a trial with an epoch done")
    (victim, *_) = training(tmp_path, 1)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)  # as the OOM killer does

    assert launcher.wait(timeout=600) == 0, log(tmp_path)[-3000:]

    by_number = {trial.number: trial for trial in trials(tmp_path)}
    dead = by_number[victim.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["fail_reason"]
    (retry,) = [trial for trial in by_number.values() if trial.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert [trial.state for trial in by_number.values()].count(TrialState.COMPLETE) == 3  # the study's total
    assert_nothing_running(tmp_path)
    dead_run = mlflow.MlflowClient().get_run(victim.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and "died" in dead_run.data.tags["classifier.end_reason"]
    assert retry.user_attrs["resume_run_id"] == dead_run.info.run_id
    retry_run = retry.user_attrs["mlflow_run_id"]
    assert retry_run != dead_run.info.run_id and metric_steps(retry_run) == list(range(8))  # every epoch in it
    assert f"run {retry_run} continues" in log(tmp_path)


def test_a_study_killed_whole_is_resumed_by_the_next_launcher(tmp_path, dataset):
    command = search_command(tmp_path, dataset, n_trials=2, n_workers=1, epochs=6)
    launcher = start(command, tmp_path)
    wait_for(lambda: training(tmp_path, 1), 300, launcher, "a trial with an epoch done")
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    (killed,) = [trial for trial in trials(tmp_path) if trial.state == TrialState.RUNNING]

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    assert again.returncode == 0, again.stderr[-3000:]
    by_number = {trial.number: trial for trial in trials(tmp_path)}
    assert by_number[killed.number].state == TrialState.FAIL
    (retry,) = [trial for trial in by_number.values() if trial.user_attrs.get("retry_of") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert [trial.state for trial in by_number.values()].count(TrialState.COMPLETE) == 2
    assert_nothing_running(tmp_path)
    assert "continues" in again.stderr and metric_steps(retry.user_attrs["mlflow_run_id"]) == list(range(6))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm to the launcher"])
def test_one_stop_request_ends_the_study_cleanly_and_leaves_its_trials_to_the_rerun(tmp_path, dataset, how):
    # Long enough that neither trial can finish between a worker's first epoch and the other's.
    command = search_command(tmp_path, dataset, n_trials=2, n_workers=2, epochs=80)
    launcher = start(command, tmp_path)
    wait_for(lambda: training(tmp_path, 2), 300, launcher, "two trials with an epoch done")
    started = time.monotonic()
    if how == "ctrl-c":
        os.killpg(launcher.pid, signal.SIGINT)  # the terminal sends it to every process of the group
    else:
        launcher.send_signal(signal.SIGTERM)  # `docker stop`, `kill PID`: the launcher alone

    assert launcher.wait(timeout=300) != 0
    assert time.monotonic() - started < 120, "the workers should stop after their current batch"
    assert_nothing_running(tmp_path)
    stopped = [trial for trial in trials(tmp_path) if trial.state == TrialState.FAIL]
    assert len(stopped) == 2, log(tmp_path)[-3000:]
    assert {run.info.status for run in runs() if run.info.run_name.startswith("trial-")} == {"KILLED"}
    assert [run.info.status for run in runs() if run.info.run_name == "search s"] == ["KILLED"]
    waiting = [trial for trial in trials(tmp_path) if trial.state == TrialState.WAITING]
    assert sorted(trial.user_attrs["retry_of"] for trial in waiting) == sorted(trial.number for trial in stopped)
    if how != "ctrl-c":
        return  # both ways leave the same journal: one rerun (80 epochs a trial) shows that it completes the study

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)

    assert again.returncode == 0, again.stderr[-3000:]
    assert [trial.state for trial in trials(tmp_path)].count(TrialState.COMPLETE) == 2
    assert again.stderr.count(" continues ") == 2  # both stopped trials go on from their checkpoints
    assert_nothing_running(tmp_path)


def test_a_second_ctrl_c_stops_at_once_and_still_leaves_nothing_running(tmp_path, dataset):
    command = search_command(tmp_path, dataset, n_trials=3, n_workers=2, epochs=200)  # killed long before the end
    launcher = start(command, tmp_path)
    wait_for(lambda: training(tmp_path, 2), 300, launcher, "two trials with an epoch done")
    started = time.monotonic()
    os.killpg(launcher.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)

    assert launcher.wait(timeout=120) != 0
    assert time.monotonic() - started < 60
    wait_for(lambda: not _group_alive(launcher.pid), 60, what="every process of the search gone")
    assert_nothing_running(tmp_path)
    assert len([trial for trial in trials(tmp_path) if trial.state == TrialState.FAIL]) == 2


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
