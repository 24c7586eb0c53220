"""Seconds to explain one 224 px image with Grad-CAM on the CPU (resnet18, simple_cnn), beside one plain prediction,
and the largest probability difference between the ONNX export and PyTorch.

    python bench/explain_bench.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from classifier.evaluation.export import export
from classifier.model.gradcam import explain_images
from classifier.model.pyfunc import ImageClassifier
from classifier.nets.models import create_model

SIZE = 224


def checkpoint(architecture: str) -> dict:
    torch.manual_seed(0)
    network = create_model(architecture, 2, 3)
    return {
        "architecture": architecture,
        "num_classes": 2,
        "in_chans": 3,
        "state_dict": network.state_dict(),
        "classes": ["normal", "pneumonia"],
        "preprocessing": {
            "size": SIZE,
            "channels": 3,
            "bit_depth": 8,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "resize": "stretch",
        },
        "threshold": None,
    }


def seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "scan.png"
        Image.fromarray(pixels).save(image)
        print(f"torch {torch.__version__}, {options.threads} CPU threads, median of {options.repeats}", file=sys.stderr)
        for architecture in ("resnet18", "simple_cnn"):
            state = checkpoint(architecture)
            classifier = ImageClassifier(state, inference_device="cpu", decode_workers=1)
            tensor = classifier.preprocess(image)
            explain = seconds(lambda: explain_images(classifier, [tensor]), options.repeats)  # noqa: B023
            predict = seconds(lambda: classifier.probabilities(tensor[None]), options.repeats)  # noqa: B023
            torch.save(state, Path(scratch) / f"{architecture}.pt")
            exported = export(str(Path(scratch) / f"{architecture}.pt"), Path(scratch) / f"{architecture}.onnx")
            print(
                f"{architecture}: explain one {SIZE} px image {explain * 1000:.1f} ms "
                f"(predict {predict * 1000:.1f} ms); ONNX vs PyTorch max |dp| {exported.max_abs_difference:.2e}"
            )


if __name__ == "__main__":
    main()
