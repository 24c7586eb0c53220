"""`classifier export MODEL --format onnx`: the network as one ONNX file that any ONNX runtime runs.

The graph takes `image`, N x C x H x W float32 pixels in [0, 1] (8-bit values / 255, 16-bit / 65535, resized as
`preprocessing.resize` says), normalises them with the training mean/std inside the graph, and answers `probabilities`
(softmax, or sigmoid for multi-label models; of the logits divided by the calibration temperature when the checkpoint
has one, as the network rebuilt from it gives them). Models with metadata also take `metadata`, the encoded rows (see
`metadata_encoding`). The ONNX metadata holds classes, threshold (with its positive class, rule and the validation
prevalence it was tuned at), task, preprocessing, calibration and the encoding as
JSON strings. The export is checked on sample inputs against PyTorch before it is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classifier import __version__, tracking
from classifier.data.metadata import encoding_width, from_plain
from classifier.data.transforms import Normalise
from classifier.errors import UserError
from classifier.learn.inference import RUN_ID, load_checkpoint
from classifier.model.checkpoint import network_from_checkpoint
from classifier.nets.models import apply_model

FORMATS = ("onnx",)
TOLERANCE = 1e-4  # the largest absolute probability difference onnxruntime may show against PyTorch (float32)
SAMPLES = 4  # sample images the check runs (random pixels and a flat grey one)
ARTIFACT_PATH = "export"
OPSET = 18


class Portable(nn.Module):
    """Normalisation, the network (its logits divided by the calibration temperature, see `with_temperature`) and its
    activation as one module."""

    def __init__(self, checkpoint: dict[str, Any]) -> None:
        super().__init__()
        preprocessing = checkpoint["preprocessing"]
        self.normalise = Normalise(preprocessing["mean"], preprocessing["std"])
        self.network = network_from_checkpoint(checkpoint)
        self.multi_label = checkpoint.get("task") == "multi_label"

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.activate(self.network(self.normalise(image)))


class PortableWithMetadata(Portable):
    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.activate(self.network(self.normalise(image), metadata))


@dataclass
class ExportResult:
    """The written file, the largest probability difference found against PyTorch, and where it was logged."""

    path: Path
    max_abs_difference: float
    run_id: str | None


def export(model: str, output: Path, format: str = "onnx") -> ExportResult:
    """Export `model` (checkpoint file, run id or model URI) to `output`, check it, log it to its source run."""
    if format not in FORMATS:
        raise UserError(f"--format {format}: unsupported; use one of {', '.join(FORMATS)}")
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise UserError(f"export needs {error.name}; pip install 'classifier[export]'") from None
    tracking.connect()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = load_checkpoint(model, Path(scratch))
    width = encoding_width(from_plain(checkpoint.get("metadata")))
    portable = (PortableWithMetadata if width else Portable)(checkpoint).eval()
    samples = sample_inputs(checkpoint, width)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        _export_graph(portable, samples, partial)
        proto = onnx.load(str(partial))
        onnx.helper.set_model_props(proto, onnx_metadata(checkpoint, model))
        onnx.save(proto, str(partial))
        difference = check(partial, checkpoint, samples, onnxruntime)
        if difference > TOLERANCE:
            raise UserError(
                f"{model}: onnxruntime differs from PyTorch by {difference:.2e} in a probability (tolerance "
                f"{TOLERANCE:g}); nothing written"
            )
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    run_id = source_run(model)
    if run_id is not None:
        tracking.log_artifact_to_run(run_id, output, ARTIFACT_PATH)
    return ExportResult(output, difference, run_id)


def sample_inputs(checkpoint: dict[str, Any], metadata_width: int) -> tuple[torch.Tensor, ...]:
    """Seeded sample inputs of the model's shape: random pixels and one flat mid-grey image (and metadata rows)."""
    preprocessing = checkpoint["preprocessing"]
    generator = torch.Generator().manual_seed(0)
    shape = (SAMPLES, int(preprocessing["channels"]), int(preprocessing["size"]), int(preprocessing["size"]))
    images = torch.rand(shape, generator=generator)
    images[-1] = 0.5
    if not metadata_width:
        return (images,)
    return images, torch.randn((SAMPLES, metadata_width), generator=generator)


def _export_graph(portable: nn.Module, samples: tuple[torch.Tensor, ...], path: Path) -> None:
    names = ["image", "metadata"][: len(samples)]
    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress
            torch.onnx.export(
                portable,
                samples,
                str(path),
                input_names=names,
                output_names=["probabilities"],
                dynamic_shapes={name: {0: batch} for name in names},
                opset_version=OPSET,
                external_data=False,
                dynamo=True,
                verbose=False,
            )
    except Exception as error:  # noqa: BLE001 - whatever torch.export or the translation raised
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"cannot export this network to ONNX ({type(error).__name__}: {reason})") from error


def reference_probabilities(checkpoint: dict[str, Any], samples: tuple[torch.Tensor, ...]) -> np.ndarray:
    """PyTorch's probabilities for the samples, computed as inference does (not through the exported module)."""
    preprocessing = checkpoint["preprocessing"]
    network = network_from_checkpoint(checkpoint)
    normalise = Normalise(preprocessing["mean"], preprocessing["std"])
    with torch.inference_mode():
        images = normalise(samples[0])
        logits = apply_model(network, images if len(samples) == 1 else (images, samples[1]))  # calibrated
        activated = logits.sigmoid() if checkpoint.get("task") == "multi_label" else logits.softmax(dim=1)
    return activated.numpy()


def check(path: Path, checkpoint: dict[str, Any], samples: tuple[torch.Tensor, ...], onnxruntime: Any) -> float:
    """The largest absolute difference between onnxruntime's and PyTorch's probabilities on the samples."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: sample.numpy() for name, sample in zip(["image", "metadata"], samples, strict=False)}
    (probabilities,) = session.run(["probabilities"], feeds)
    return float(np.abs(probabilities - reference_probabilities(checkpoint, samples)).max())


def onnx_metadata(checkpoint: dict[str, Any], source: str) -> dict[str, str]:
    """What a consumer needs beside the graph, as strings (JSON where structured)."""
    preprocessing = dict(checkpoint["preprocessing"])
    temperature = checkpoint.get("temperature")
    return {
        "classes": json.dumps(list(checkpoint["classes"])),
        "threshold": json.dumps(checkpoint.get("threshold")),
        "positive_class": json.dumps(checkpoint.get("positive_class")),  # what the threshold is on
        "threshold_rule": json.dumps(checkpoint.get("threshold_rule")),  # how it was tuned, e.g. youden
        "threshold_prevalence": json.dumps(checkpoint.get("threshold_prevalence")),  # the positives' share it saw
        "task": str(checkpoint.get("task", "single_label")),
        "architecture": str(checkpoint["architecture"]),
        "preprocessing": json.dumps(preprocessing),
        "input": "image: N x C x H x W float32 in [0, 1] (pixel / 255, or / 65535 for 16-bit), resized to "
        f"{preprocessing['size']} px ({preprocessing['resize']}); mean/std are applied inside the graph",
        "calibration": json.dumps({"temperature": float(temperature)} if temperature is not None else None),
        "metadata_encoding": json.dumps(checkpoint.get("metadata") or []),
        "source": source,
        "classifier_version": __version__,
        "checked_tolerance": repr(TOLERANCE),
    }


def source_run(model: str) -> str | None:
    """The MLflow run a model came from: a run id itself, a runs:/ or models:/ URI's run; None for a file."""
    if Path(model).exists():
        return None
    if RUN_ID.fullmatch(model):
        return model
    return tracking.model_run_id(model)
