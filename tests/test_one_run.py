"""One process writes a run: a live run is never joined, a dead one is resumed; process identities and locks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import metric_steps as steps
from conftest import run_status as status
from conftest import train_command, wait_for
from prepared import tiny_train_config as quick

from classifier import processes
from classifier.errors import UserError
from classifier.learn.train import fit


def test_a_process_is_gone_once_it_ends_or_its_pid_names_another() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    recorded = processes.identity(child.pid)
    assert processes.is_gone(recorded) is False and processes.is_gone(processes.identity()) is False
    assert processes.is_gone({**recorded, "started": recorded["started"] + 30}) is True  # a reused pid
    assert processes.is_gone({**recorded, "host": f"not-{socket.gethostname()}"}) is None  # another machine's
    child.kill()
    wait_for(lambda: processes.is_gone(recorded), 30, what="the killed child seen as gone")  # a zombie counts
    child.wait()
    assert processes.is_gone(recorded) is True


def test_a_lock_names_its_holder_and_ends_with_it(tmp_path: Path) -> None:
    path = tmp_path / ".run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from classifier import processes; processes.lock({str(path)!r}); input()"],
        stdin=subprocess.PIPE,
    )
    wait_for(lambda: path.is_file() and path.stat().st_size > 0, 60, holder, "the lock taken")
    with pytest.raises(processes.Held) as held:
        processes.lock(path)
    assert held.value.holder["pid"] == holder.pid
    holder.kill()
    holder.wait()

    descriptor = processes.lock(path)  # the holder died: the lock is free, whatever it left behind
    processes.unlock(descriptor, path)
    assert not path.exists()


def test_resuming_a_run_another_process_writes_is_refused(grey_pair: Path, tmp_path: Path) -> None:
    def stop(epoch: int, metrics: dict[str, float]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(quick(tmp_path), grey_pair, on_epoch_end=stop, log_model=False)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    lock = tmp_path / "outputs" / f".{run.info.run_id}.lock"
    descriptor = processes.lock(lock)  # as the process writing the run holds it
    try:
        with pytest.raises(UserError, match=f"run {run.info.run_id} is being written by pid"):
            fit(quick(tmp_path, resume=run.info.run_id), grey_pair, log_model=False)
    finally:
        processes.unlock(descriptor, lock)
    assert fit(quick(tmp_path), grey_pair, log_model=False).run_id == run.info.run_id


@pytest.mark.slow
def test_two_identical_train_commands_at_once_never_share_a_run(grey_pair: Path, tmp_path: Path) -> None:
    output = tmp_path / "outputs"
    command = train_command(grey_pair, output, 400)
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(output.glob("*/last.pt")), 300, first, "the first command's checkpoint")

        second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

        assert second.returncode == 1
        (line,) = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
        assert f"another `classifier train` of this config and data is running by pid {first.pid}" in line
        assert first.poll() is None  # the first one trains on, alone
        (run_id,) = [folder.name for folder in output.iterdir() if folder.is_dir()]
        assert len(mlflow.search_runs(search_all_experiments=True)) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert status(run_id) == "KILLED"
    done = len(steps(run_id))

    resumed = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(steps(run_id)) > done, 300, resumed, "an epoch more")  # the first one's process is gone
    resumed.send_signal(signal.SIGTERM)
    _, stderr = resumed.communicate(timeout=120)
    assert f"resuming run {run_id}" in stderr, stderr[-2000:]
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1
