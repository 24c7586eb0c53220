"""Which threshold rule travels to independent images: each rule tuned on a cross-validated study's out-of-fold
predictions (as `search --refit folds` tunes the champion's), then applied to the champion's probabilities on
images that no choice saw.

    python bench/threshold_rules.py DATA STUDY HOLDOUT [--model models:/NAME@champion] [--storage optuna.journal]

DATA is the dataset the study ran on, HOLDOUT a folder of PNGs named INDEX_LABEL.png (`bench/plain_baseline.py
holdout` writes PneumoniaMNIST's official validation split so). Per rule it prints the threshold, the out-of-fold
positive share it was tuned at, and on HOLDOUT sensitivity, specificity, balanced accuracy and accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import optuna
from sklearn.metrics import balanced_accuracy_score, recall_score

from classifier import tracking
from classifier.config import ThresholdRule
from classifier.data.dataset import load_split
from classifier.data.layout import positive_index, read_info
from classifier.learn.device import resolve_device
from classifier.learn.inference import load_checkpoint
from classifier.measure.threshold import choose_threshold
from classifier.model.pyfunc import load_classifier
from classifier.tune.refit import FOLD_RUNS_ATTR, out_of_fold
from classifier.tune.storage import JOURNAL_FILE, open_storage

RULES = ("max_f1", "youden", "balanced", "recall:0.95", "specificity:0.9")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("study")
    parser.add_argument("holdout", type=Path)
    parser.add_argument("--model", help="The model scored on HOLDOUT. [models:/STUDY@champion]")
    parser.add_argument("--storage", default=JOURNAL_FILE)
    args = parser.parse_args()
    tracking.connect()
    info = read_info(args.data)
    study = optuna.load_study(study_name=args.study, storage=open_storage(args.storage))
    fold_runs = study.best_trial.user_attrs[FOLD_RUNS_ATTR]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = [load_checkpoint(run, Path(scratch) / run) for run in fold_runs]
    labels, probabilities = out_of_fold(checkpoints, load_split(args.data, "training"), 256, resolve_device("auto"))
    positive = positive_index(info.classes, checkpoints[0]["positive_class"], info.task)
    tuned_on = labels == positive

    paths = sorted(args.holdout.glob("*.png"))
    truth = np.array([path.stem.split("_", 1)[1] == info.classes[positive] for path in paths], dtype=int)
    table = load_classifier(args.model or f"models:/{args.study}@champion").predict([str(path) for path in paths])
    scores = table[f"prob_{info.classes[positive]}"].to_numpy()

    print(
        f"trial {study.best_trial.number}: {len(labels)} out-of-fold images ({tuned_on.mean():.0%} positive); "
        f"{len(paths)} independent images ({truth.mean():.0%} positive)"
    )
    print(f"{'rule':<16} {'threshold':>9} {'sensitivity':>11} {'specificity':>11} {'bal. acc':>8} {'ACC':>6}")
    for rule in RULES:
        threshold = choose_threshold(tuned_on, probabilities[:, positive], ThresholdRule.parse(rule))
        decided = (scores >= threshold).astype(int)
        sensitivity = recall_score(truth, decided, pos_label=1)
        specificity = recall_score(truth, decided, pos_label=0)
        balanced = balanced_accuracy_score(truth, decided)
        print(
            f"{rule:<16} {threshold:9.4f} {sensitivity:11.3f} {specificity:11.3f} {balanced:8.3f} "
            f"{np.mean(decided == truth):6.3f}"
        )


if __name__ == "__main__":
    main()
