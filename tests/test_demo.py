"""The README's demo as written after its set-up, in a copy of the project (fewer trials and epochs): every run
lands in the experiment the demo names, each named for what it did, and the champion predicts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

SHORTER = ["-P", "n_trials=2", "-P", "epochs=2"]  # the demo's search, cut to fit a test


def demo_commands() -> list[list[str]]:
    """The README's first command line, split at `&&`, without the set-up steps (venv, pip, activate)."""
    block = re.search(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)[1]
    steps = [shlex.split(step) for step in block.split("&&")]
    return [step for step in steps if step[0] in ("classifier", "mlflow")]


def test_the_demo_puts_every_run_in_its_experiment_under_a_name_that_says_what_it_did(tmp_path):
    commands = demo_commands()
    assert [command[:2] for command in commands] == [
        ["classifier", "example-data"],
        ["mlflow", "run"],
        ["mlflow", "run"],
        ["classifier", "predict"],
    ]
    experiment = commands[1][commands[1].index("--experiment-name") + 1]
    assert commands[2][commands[2].index("--experiment-name") + 1] == experiment
    for name in ("MLproject", "conda.yaml", "experiments/digits.yaml"):  # the project `mlflow run .` reads
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text((REPO / name).read_text())
    bin_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": bin_path, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for command in commands:
        if "search" in command:
            command = [*command, *SHORTER]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    names = sorted(run.info.run_name for run in runs)
    assert names == ["prepare digits", "search digits", "trial-0", "trial-1"]
    assert all(run.info.status == "FINISHED" for run in runs)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(list((tmp_path / "digits" / "7").glob("*.png"))) > 0
    assert (predictions["label"].astype(str) == "7").mean() > 0.5
