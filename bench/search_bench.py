"""Search figures on PneumoniaMNIST: trials/hour with 1 and 2 workers, and epochs saved by median pruning.

Each study is one `classifier search` command (a subprocess, as a user runs it: imports, launcher, workers and
the champion's registration included), tracked in a folder of its own.

1. Throughput: the same study (no pruning, 20 trials) with `--n-workers 1` and `--n-workers 2`, one CPU thread per
   worker, so the ratio shows what the launcher, the shared journal storage and MLflow tracking cost. Target: >= 1.8x.
   Start-up: from the command's start to the first trial of every worker, the median of `--start-up-rounds` studies
   of one 1-epoch trial a worker (one such start varies by seconds); starting 2 workers may cost at most 5 s more
   than starting 1.
2. Pruning: a random-sampler study without pruning, then the same sampler seed (hence the same trials) with median
   pruning; epochs spent until each study first reached the unpruned study's best validation score. Target <= 0.5x.

    python bench/search_bench.py [PREPARED_DATASET] [--part throughput|pruning|all] [--train-images 1200]

Without a dataset it prepares ../shared/data/pneumoniamnist_trainval.npz at 28 px in a temporary folder: a seeded
random subset of `--train-images` training images (0: all 4708) and the whole validation split (524 images), so
that each part runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml

from classifier.config import PrepareConfig
from classifier.data.prepare import prepare
from classifier.tune.storage import open_storage

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_trainval.npz"
TRAIN = {"model": "simple_cnn", "batch_size": 128, "num_workers": 0, "system_metrics": False, "amp": "off"}


def pneumonia_subset(scratch: Path, train_images: int) -> Path:
    """PneumoniaMNIST prepared at 28 px, with a seeded random subset of its training images."""
    arrays = dict(np.load(NPZ))
    if train_images:
        keep = np.sort(np.random.default_rng(0).permutation(len(arrays["train_labels"]))[:train_images])
        arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    np.savez(scratch / "pneumonia.npz", **arrays)
    prepare(scratch / "pneumonia.npz", scratch / "pneumonia", PrepareConfig(size=28))
    return scratch / "pneumonia"


def run_study(
    scratch: Path, data: Path, name: str, train: dict, search_options: dict
) -> tuple[float, optuna.Study, datetime.datetime]:
    """Run one study as a `classifier search` command tracked in its own folder; return its wall time, the finished
    study and when the command started."""
    folder = scratch / name
    folder.mkdir()
    storage = str(folder / "optuna.journal")
    experiment = folder / "experiment.yaml"
    sections = {
        "train": {**TRAIN, **train, "output_dir": str(folder / "outputs")},
        "search": {"study_name": name, "storage": storage, **search_options},
    }
    experiment.write_text(yaml.safe_dump(sections))
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    environment.pop("MLFLOW_EXPERIMENT_ID", None)
    command = [str(Path(sys.executable).with_name("classifier")), "search", str(data), "--config", str(experiment)]
    started, wall_start = time.perf_counter(), datetime.datetime.now()
    subprocess.run(command, check=True, env=environment, cwd=folder, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    return elapsed, optuna.load_study(study_name=name, storage=open_storage(storage)), wall_start


def epochs_to_reach(study: optuna.Study, target: float) -> int | None:
    """Epochs trained, in trial order, until a trial first scored `target` or better (None: never)."""
    spent = 0
    for trial in sorted(study.trials, key=lambda trial: trial.number):
        spent += len(trial.intermediate_values)
        if trial.value is not None and trial.value >= target:
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, help="prepared dataset (default: PneumoniaMNIST at 28 px)")
    parser.add_argument("--part", choices=["throughput", "pruning", "all"], default="all")
    parser.add_argument("--train-images", type=int, default=1200, help="training subset size (0: all)")
    parser.add_argument("--throughput-trials", type=int, default=20)
    parser.add_argument("--pruning-trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial in the pruning comparison")
    parser.add_argument("--start-up-rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="search-bench-"))
    data = args.data or pneumonia_subset(scratch, args.train_images)

    space = {
        "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    }
    if args.part in ("throughput", "all"):
        measure_throughput(scratch, data, space, args.throughput_trials)
        measure_start_up(scratch, data, space, args.start_up_rounds)
    if args.part in ("pruning", "all"):
        measure_pruning(scratch, data, space, args.pruning_trials, args.epochs)


def measure_throughput(scratch: Path, data: Path, space: dict, trials: int) -> None:
    """Trials/hour over the whole command (with worker start-up) and steady (first trial start to last trial end)."""
    rates = {}
    for workers in (1, 2):
        elapsed, study, _ = run_study(
            scratch, data, f"throughput-{workers}", {"epochs": 2}, study_options(trials, workers, space)
        )
        starts = sorted(trial.datetime_start for trial in study.trials)
        last = max(trial.datetime_complete for trial in study.trials)
        steady = (last - starts[0]).total_seconds()
        rates[workers] = (trials / elapsed * 3600, trials / steady * 3600)
        print(
            f"{workers} worker(s): {trials} trials in {elapsed:.0f} s = {rates[workers][0]:.0f} trials/h; "
            f"steady {steady:.0f} s = {rates[workers][1]:.0f} trials/h"
        )
    whole, steady = (rates[2][index] / rates[1][index] for index in (0, 1))
    print(f"throughput 2 vs 1 workers: {whole:.2f}x whole command, {steady:.2f}x steady (target >= 1.8x)")


def measure_start_up(scratch: Path, data: Path, space: dict, rounds: int) -> None:
    """Seconds from the command's start until every worker has begun a trial, with 1 and 2 workers (the median of
    `rounds` studies of one 1-epoch trial a worker, taken in turns)."""
    start_up: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(rounds):
        for workers in (1, 2):
            _, study, started = run_study(
                scratch, data, f"start-up-{workers}-{round_}", {"epochs": 1}, study_options(workers, workers, space)
            )
            start_up[workers].append((max(trial.datetime_start for trial in study.trials) - started).total_seconds())
    one, two = (statistics.median(start_up[workers]) for workers in (1, 2))
    print(f"first trial of every worker after {one:.1f} s (1 worker) and {two:.1f} s (2 workers), median of {rounds}")
    print(f"starting 2 workers costs {two - one:+.1f} s more than starting 1 (target <= 5 s)")


def study_options(trials: int, workers: int, space: dict) -> dict:
    """A study of `trials` unpruned trials on `workers` workers of one CPU thread each."""
    return {"n_trials": trials, "n_workers": workers, "threads_per_worker": 1, "pruner": "none", "space": space}


def measure_pruning(scratch: Path, data: Path, space: dict, trials: int, epochs: int) -> None:
    common = {"n_trials": trials, "sampler": "random", "seed": 7, "space": space, "objective": "val_roc_auc"}
    common.update(startup_trials=2, prune_warmup_epochs=0)  # the median of 2 full trials decides from epoch 1
    _, full, _ = run_study(scratch, data, "no-pruning", {"epochs": epochs}, {**common, "pruner": "none"})
    _, pruned, _ = run_study(scratch, data, "median-pruning", {"epochs": epochs}, {**common, "pruner": "median"})
    target = full.best_value
    full_epochs, pruned_epochs = epochs_to_reach(full, target), epochs_to_reach(pruned, target)
    total_full = sum(len(trial.intermediate_values) for trial in full.trials)
    total_pruned = sum(len(trial.intermediate_values) for trial in pruned.trials)
    print(f"best val_roc_auc {target:.4f} (trial {full.best_trial.number}); its best-epoch metrics:")
    for key, value in sorted(full.best_trial.user_attrs["best_metrics"].items()):
        if key in ("val_accuracy", "val_balanced_accuracy", "val_roc_auc", "val_macro_f1", "val_pr_auc"):
            print(f"  {key} {value:.4f}")
    print(f"pruned trials: {sum(trial.state.name == 'PRUNED' for trial in pruned.trials)} of {len(pruned.trials)}")
    if pruned_epochs is None:
        print(f"median pruning never reached it (pruned the best trial); its best: {pruned.best_value:.4f}")
    else:
        print(f"epochs to reach it: {full_epochs} without pruning, {pruned_epochs} with median pruning")
        print(f"epochs ratio pruned / unpruned: {pruned_epochs / full_epochs:.2f}x (target <= 0.5x)")
    print(f"whole study: {total_full} vs {total_pruned} epochs = {total_pruned / total_full:.2f}x")


if __name__ == "__main__":
    main()
