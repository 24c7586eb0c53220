"""The fixed MLflow cost of one search trial, against a real local `mlflow server` subprocess.

A trial is what `classifier search` runs: `fit` as a nested run under a parent run, system metrics on the parent only.
Every classifier.tracking call `fit` makes (and the pyfunc model logging) is timed while a real, short training runs.
The trial is run twice in one process: first as the code ran before (an unbuffered async-logging queue, whose blocking
read holds up every flush and run end by up to a second, and a system-metrics thread per trial run), then as it runs
now. The trial trains as many epochs as take `--trial-seconds` (an epoch timed on a few batches first). The figures:
start and end of the run, the whole fixed cost per trial, the per-epoch cost, and the share of the trial's measured
wall time spent in MLflow calls (target < 1% of a 60 s trial).

    python bench/tracking_bench.py [PREPARED_DATASET] [--model simple_cnn] [--trial-seconds 60] [--epochs N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from classifier import tracking
from classifier.config import TrainConfig
from classifier.learn import train
from classifier.learn.probe import epoch_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import start_mlflow_server  # noqa: E402
from train_bench import prepared_dataset  # noqa: E402

PER_EPOCH = ("log_metrics",)
seconds: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            calls[name] += 1

    return wrapper


def timed_start_run(function):
    """Time entering and leaving the run context (creating it; flushing and ending it)."""

    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        manager = function(*args, **kwargs)
        start = time.perf_counter()
        run = manager.__enter__()
        seconds["start_run"] += time.perf_counter() - start
        calls["start_run"] += 1
        try:
            yield run
        except BaseException:
            if not manager.__exit__(*sys.exc_info()):
                raise
        else:
            start = time.perf_counter()
            manager.__exit__(None, None, None)
            seconds["end_run"] += time.perf_counter() - start
            calls["end_run"] += 1

    return wrapper


def instrument() -> None:
    """Wrap the tracking calls that `fit` makes, where it looks them up."""
    for name in ("connect", "log_params", "log_metrics", "log_artifacts", "unfinished_run", "run_info"):
        setattr(tracking, name, timed(name, getattr(tracking, name)))
    tracking.start_run = timed_start_run(tracking.start_run)
    train.log_classifier_model = timed("log_classifier_model", train.log_classifier_model)


def one_trial(config: TrainConfig, data: Path, buffering_s: str, per_trial_system_metrics: bool) -> dict[str, float]:
    """Tracking seconds by call for one trial (a nested `fit` under a fresh parent run)."""
    os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = buffering_s
    seconds.clear()
    calls.clear()
    with tracking.start_run(config.experiment, "search bench") as parent:
        seconds.clear()  # the parent run is the study's, not the trial's
        calls.clear()
        trial = TrainConfig(**{**config.__dict__, "system_metrics": per_trial_system_metrics})
        started = time.perf_counter()
        result = train.fit(trial, data, parent_run_id=parent.info.run_id, run_name="trial")
        wall = time.perf_counter() - started
    return {**seconds, "wall": wall, "epochs": result.epochs_run}


def report(label: str, figures: dict[str, float]) -> float:
    epochs = figures.pop("epochs")
    wall = figures.pop("wall")
    per_epoch = sum(figures.get(name, 0.0) for name in PER_EPOCH) / epochs
    fixed = sum(value for name, value in figures.items() if name not in PER_EPOCH)
    share = sum(figures.values()) / wall
    print(f"{label}: fit {wall:.1f} s for {epochs:.0f} epochs")
    print(f"  start_run {figures.get('start_run', 0):.3f} s, end_run {figures.get('end_run', 0):.3f} s")
    for name in sorted(figures, key=figures.get, reverse=True):
        if name not in ("start_run", "end_run"):
            print(f"  {name:22s} {calls[name]:4d} calls {figures[name] * 1000:9.1f} ms")
    print(f"  fixed cost per trial {fixed:.2f} s, per epoch {per_epoch * 1000:.1f} ms")
    print(f"  share of this {wall:.0f} s trial spent in MLflow calls: {share:.2%} (target < 1% of a 60 s trial)")
    return fixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path)
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--trial-seconds", type=float, default=60.0, help="How long the trial trains.")
    parser.add_argument("--epochs", type=int, help="Epochs per trial. [as many as take --trial-seconds]")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        url, server = start_mlflow_server(Path(scratch) / "server")
        try:
            os.environ["MLFLOW_TRACKING_URI"] = url
            data = args.data or prepared_dataset(Path(scratch))
            instrument()
            config = TrainConfig(
                experiment="tracking-bench",
                model=args.model,
                batch_size=args.batch_size,
                output_dir=Path(scratch) / "outputs",
            )
            epochs = args.epochs or max(1, round(args.trial_seconds / epoch_seconds(config, data)))
            config = dataclasses.replace(config, epochs=epochs)
            tracking.connect()
            before = one_trial(config, data, buffering_s="0", per_trial_system_metrics=True)
            now = one_trial(config, data, buffering_s="1", per_trial_system_metrics=False)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.model} trials against {url}")
    fixed_before = report("before (unbuffered queue, system metrics per trial)", before)
    fixed_now = report("now (1 s buffered queue, system metrics on the parent run)", now)
    print(f"fixed cost per trial: {fixed_now:.2f} s, {fixed_before / fixed_now:.1f}x less than before")


if __name__ == "__main__":
    main()
