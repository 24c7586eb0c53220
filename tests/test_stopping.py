"""Signals never interrupt a write: a stop request ends the run KILLED between two batches, and it resumes whole."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import metric_steps as steps
from conftest import run_status as status
from conftest import train_command, wait_for
from prepared import tiny_train_config as quick

from classifier import stopping
from classifier.learn.train import fit


def test_the_first_signal_only_requests_a_stop_and_the_second_forces() -> None:
    before = {number: signal.getsignal(number) for number in stopping.SIGNALS}
    with stopping.on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: stopping.requested() is not None, 10, what="stop request")
        assert stopping.requested() == "SIGTERM"
        with pytest.raises(stopping.Interrupted):
            stopping.check()
        with pytest.raises(KeyboardInterrupt) as forced:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises here, long before the end
        assert not isinstance(forced.value, stopping.Interrupted)
    assert stopping.requested() is None
    assert {number: signal.getsignal(number) for number in stopping.SIGNALS} == before


def test_a_stop_between_epochs_ends_the_run_killed_and_the_rerun_completes_it(grey_pair: Path, tmp_path: Path) -> None:
    config = quick(tmp_path)
    uninterrupted = fit(quick(tmp_path, experiment="reference"), grey_pair, log_model=False)

    with stopping.on_signals(), pytest.raises(stopping.Interrupted):
        fit(config, grey_pair, on_epoch_end=lambda epoch, metrics: stopping.request("SIGTERM"), log_model=False)
    (killed,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("classifier").experiment_id])
    assert killed.info.status == "KILLED" and steps(killed.info.run_id) == [0]

    resumed = fit(config, grey_pair, log_model=False)

    assert resumed.run_id == killed.info.run_id and status(resumed.run_id) == "FINISHED"
    assert steps(resumed.run_id) == [0, 1, 2]
    assert resumed.best_metrics == uninterrupted.best_metrics


def test_a_stop_while_finishing_ends_killed_and_the_rerun_only_finishes(grey_pair: Path, tmp_path: Path) -> None:
    config = quick(tmp_path, epochs=2)

    def stop_after_the_last_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            stopping.request("SIGTERM")

    with stopping.on_signals(), pytest.raises(stopping.Interrupted):
        fit(config, grey_pair, on_epoch_end=stop_after_the_last_epoch, log_model=False)
    (killed,) = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("classifier").experiment_id])
    assert killed.info.status == "KILLED"

    resumed = fit(config, grey_pair, log_model=False)

    assert resumed.run_id == killed.info.run_id and status(resumed.run_id) == "FINISHED"
    assert steps(resumed.run_id) == [0, 1] and resumed.epochs_run == 2
    assert "best_epoch" in mlflow.MlflowClient().get_run(resumed.run_id).data.metrics


def test_a_finished_run_is_not_resumed(grey_pair: Path, tmp_path: Path) -> None:
    done = fit(quick(tmp_path, epochs=1), grey_pair, log_model=False)

    with pytest.raises(Exception, match="already finished; nothing to resume"):
        fit(quick(tmp_path, epochs=1, resume=done.run_id), grey_pair, log_model=False)


def last_epoch(output: Path) -> int:
    """The epoch of the newest committed `last.pt` under `output`, -1 while there is none."""
    found = list(output.glob("*/last.pt"))
    if not found:
        return -1
    try:
        return torch.load(found[0], weights_only=True)["epoch"]
    except Exception:  # replaced while read
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 3])
def test_sigterm_right_after_a_checkpoint_never_hangs_and_the_run_resumes(
    grey_pair: Path, tmp_path: Path, epochs: int
) -> None:
    """With one epoch the signal lands while the model is logged (MLflow validates its input example, logging
    runs): it used to hang there for good with the run RUNNING."""
    output = tmp_path / "outputs"
    command = train_command(grey_pair, output, epochs)
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(output.glob("*/last.pt")), 300, process, "checkpoint")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    (run_id,) = [folder.name for folder in output.iterdir() if folder.is_dir()]
    if process.returncode == 0:  # the signal came after the last write: the run is simply done
        assert status(run_id) == "FINISHED"
        return
    assert status(run_id) == "KILLED", stderr[-2000:]
    assert f"run {run_id} stopped after epoch" in stderr

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming run {run_id}" in again.stderr and f"run {run_id}:" in again.stdout
    assert status(run_id) == "FINISHED" and steps(run_id) == list(range(epochs))


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_loses_no_epoch_metrics(grey_pair: Path, tmp_path: Path) -> None:
    output = tmp_path / "outputs"
    command = train_command(grey_pair, output, 4)
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: last_epoch(output) >= 1, 300, process, "checkpoint of epoch 1")
    process.kill()  # metrics used to be queued after the checkpoint: that epoch's were lost
    process.wait(timeout=60)
    (run_id,) = [folder.name for folder in output.iterdir() if folder.is_dir()]
    assert status(run_id) == "RUNNING"  # nobody could end it

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming run {run_id}" in again.stderr
    assert status(run_id) == "FINISHED"
    for metric in ("val_loss", "train_loss", "lr"):
        # every epoch is there; one killed after its metrics but before its checkpoint is trained and logged again
        assert sorted(set(steps(run_id, metric))) == [0, 1, 2, 3], metric
