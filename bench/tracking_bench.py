"""Share of `fit`'s wall time spent in MLflow calls, against a real local `mlflow server` subprocess.

Every function of classifier.tracking that `fit` calls (and the pyfunc model logging) is timed while a real
training runs. Per-epoch metrics go out as one asynchronous batch, so the epoch loop should spend < 1% in MLflow;
the fixed end-of-run cost (reports, checkpoints and the model uploaded once) is printed separately.

    python bench/tracking_bench.py [PREPARED_DATASET] [--model simple_cnn] [--epochs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from classifier import pyfunc, tracking
from classifier.config import TrainConfig
from classifier.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import start_mlflow_server  # noqa: E402
from train_bench import prepared_dataset  # noqa: E402

END_OF_RUN = ("log_artifacts", "log_classifier_model")
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
    """Time entering and leaving the run context (creating/joining it; flushing and ending it)."""

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
    for name in ("connect", "log_params", "log_metrics", "log_artifacts"):
        setattr(tracking, name, timed(name, getattr(tracking, name)))
    for name in ("unfinished_run", "run_info", "active_run_id"):
        setattr(tracking, name, timed(name, getattr(tracking, name)))
    tracking.start_run = timed_start_run(tracking.start_run)
    pyfunc.log_classifier_model = timed("log_classifier_model", pyfunc.log_classifier_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path)
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--epochs", type=int, default=5)
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
                epochs=args.epochs,
                batch_size=args.batch_size,
                output_dir=Path(scratch) / "outputs",
            )
            start = time.perf_counter()
            result = fit(config, data)
            wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
    total = sum(seconds.values())
    end_of_run = sum(seconds[name] for name in END_OF_RUN)
    print(f"{args.model}, {result.epochs_run} epochs, tracking server {url}: fit took {wall:.1f} s")
    for name in sorted(seconds, key=seconds.get, reverse=True):
        print(f"  {name:22s} {calls[name]:4d} calls {seconds[name] * 1000:9.1f} ms")
    print(f"MLflow share of wall time, epochs and run bookkeeping: {(total - end_of_run) / wall:7.2%} (target < 1%)")
    print(f"MLflow share including the end-of-run uploads:         {total / wall:7.2%} ({end_of_run:.1f} s, once)")


if __name__ == "__main__":
    main()
