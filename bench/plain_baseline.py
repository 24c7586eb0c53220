"""PneumoniaMNIST's official validation split as an independent test: a plain PyTorch baseline beside our models.

    python bench/plain_baseline.py holdout OUT              # OUT/train_only.npz (to prepare) + OUT/holdout/*.png
    python bench/plain_baseline.py score OUT [MODEL ...]    # the plain script, then each MODEL via `classifier predict`

The official validation images never reach `classifier prepare`, so nothing we tune sees them. `score` trains the
plain script (resnet18 from scratch, 28 px, 15 epochs, AdamW, no augmentation, argmax) on the train split and prints
ACC, ROC AUC and balanced accuracy of it and of each MODEL (a checkpoint, run id or model URI such as
models:/pneumonia@champion).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_trainval.npz"
CLASSES = ("normal", "pneumonia")


def holdout(out: Path, npz: Path) -> None:
    """Write the train split alone as an .npz and the validation images as PNGs named by index and label."""
    arrays = np.load(npz)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "train_only.npz", train_images=arrays["train_images"], train_labels=arrays["train_labels"]
    )
    folder = out / "holdout"
    folder.mkdir(exist_ok=True)
    for index, (pixels, label) in enumerate(zip(arrays["val_images"], arrays["val_labels"].ravel(), strict=True)):
        Image.fromarray(pixels).save(folder / f"{index:04d}_{CLASSES[int(label)]}.png")
    print(f"{out / 'train_only.npz'}: {len(arrays['train_labels'])} images; {folder}: {len(arrays['val_labels'])}")


def plain_script(npz: Path, epochs: int = 15, seed: int = 0) -> tuple[np.ndarray, float]:
    """Train resnet18 from scratch on the train split; return its validation-split P(pneumonia) and seconds."""
    torch.manual_seed(seed)
    arrays = np.load(npz)

    def tensors(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(arrays[f"{prefix}_images"]).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
        return images, torch.from_numpy(arrays[f"{prefix}_labels"].ravel()).long()

    (x, y), (x_val, _) = tensors("train"), tensors("val")
    model = torchvision.models.resnet18(num_classes=2)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started = time.monotonic()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(128):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probabilities = torch.cat([model(part).softmax(1)[:, 1] for part in x_val.split(512)]).numpy()
    return probabilities, time.monotonic() - started


def predicted(model: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """`classifier predict` of MODEL on the holdout PNGs: its labels and P(pneumonia), in file order."""
    output = folder.parent / "predictions.csv"
    classifier = str(Path(sys.executable).with_name("classifier"))
    subprocess.run([classifier, "predict", model, str(folder), "-o", str(output)], check=True)
    table = pd.read_csv(output).sort_values("path")
    return (table["label"] == "pneumonia").to_numpy(int), table["prob_pneumonia"].to_numpy()


def score(out: Path, npz: Path, models: list[str]) -> None:
    truth = np.load(npz)["val_labels"].ravel()
    probabilities, seconds = plain_script(npz)
    rows = [("plain script (resnet18, 28 px, 15 epochs)", (probabilities >= 0.5).astype(int), probabilities)]
    print(f"plain script trained in {seconds:.0f} s", file=sys.stderr)
    rows += [(model, *predicted(model, out / "holdout")) for model in models]
    print(f"{'model':<60} {'ACC':>6} {'ROC AUC':>8} {'bal. ACC':>9}   ({len(truth)} independent images)")
    for name, labels, scores in rows:
        figures = accuracy_score(truth, labels), roc_auc_score(truth, scores), balanced_accuracy_score(truth, labels)
        print(f"{name:<60} {figures[0]:6.3f} {figures[1]:8.3f} {figures[2]:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["holdout", "score"])
    parser.add_argument("out", type=Path)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--npz", type=Path, default=NPZ)
    args = parser.parse_args()
    if args.step == "holdout":
        holdout(args.out, args.npz)
    else:
        score(args.out, args.npz, args.models)


if __name__ == "__main__":
    main()
