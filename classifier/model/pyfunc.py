"""The logged model: raw images in; label, confidence and per-class probabilities out; preprocessing inside.

Input contract (`mlflow.pyfunc.load_model(uri).predict(df)`, `/invocations` of `mlflow models serve`): a DataFrame
with one string column `image`, each cell raw image bytes, a base64 string (a `data:image/...;base64,` prefix and
line breaks are allowed) or the path of an image file readable where the model runs. A model trained with metadata
also needs its metadata columns (e.g. age, sex), named in the signature; an empty cell is a missing value.

Output contract: one row per input row, in order, with columns
  label         the predicted class name; multi-label models: the predicted classes, space-separated (may be empty)
  confidence    the probability of that class. Multi-label models: the lowest probability among the predicted
                classes (the model's weakest claim: every class in `label` has at least this probability); with
                no class predicted, 1 minus the highest probability (how sure it is that even the likeliest class
                is absent)
  prob_<class>  the probability of each class, in the checkpoint's class order
  error         null, or why the row's image could not be read (its label is then null and its probabilities NaN)
An unreadable image never fails the batch. For two classes with a decision threshold in the checkpoint, the label is
the positive class (the checkpoint's `positive_class`; the second class in models that predate it) when its
probability reaches the threshold; a multi-label model predicts each class whose probability reaches that class's
threshold (tuned on validation). `ImageClassifier.decision` says so per model: the threshold(s) and the rule in words,
which `classifier predict` writes beside each label (columns `threshold` or `threshold_<class>`, and `rule`) and
`classifier serve` answers. A model calibrated in training (`temperature` in the checkpoint) serves calibrated
probabilities: its network divides its logits by the temperature.

Model settings (`model_config`, overridable with `mlflow.pyfunc.load_model(uri, model_config={...})`): `tta`
(average the probabilities over the flips the model was trained with; null: as it was trained, `tta` in the
checkpoint, its threshold tuned on those probabilities), `inference_batch_size`, `inference_device`
("cpu", "cuda"; null: cuda when available), `decode_workers` (threads decoding images; null: one per core),
`dicom_window` ([centre, width] for DICOM inputs; null: the window prepare used, else the file's VOI LUT / window)
and `dicom_frame` (the frame of multi-frame DICOMs; null: as prepare did, else the first). MLflow also logs
these as params of the run the model is logged in, so their names must differ from the training run's params.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType
from PIL import Image

from classifier.console import hushed
from classifier.console import progress as progress_bar
from classifier.data.dicom import DicomSettings
from classifier.data.images import image_channels, normalise_mode, open_channels, open_image, resize
from classifier.data.layout import positive_index
from classifier.data.metadata import encode, from_plain
from classifier.data.transforms import Normalise, checkpoint_flips, flips, image_to_tensor, uses_tta
from classifier.errors import UserError
from classifier.model.checkpoint import INFERENCE_KEYS, network_from_checkpoint, read_checkpoint, stored_threshold_rule
from classifier.nets.models import apply_model

INPUT_COLUMN = "image"
ERROR_COLUMN = "error"
CHECKPOINT_ARTIFACT = "checkpoint"
KEPT_KEYS = (
    *INFERENCE_KEYS,
    *("config", "task", "metadata", "positive_class", "temperature", "threshold_rule", "threshold_prevalence", "tta"),
)
DEFAULT_SETTINGS: dict[str, Any] = {
    "tta": None,
    "inference_batch_size": 64,
    "inference_device": None,
    "decode_workers": None,
    "dicom_window": None,
    "dicom_frame": None,
}
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "kornia",
    "pillow",
    "numpy",
    "pandas",
    "click",
    "tqdm",
    "pydicom",
)
MODES_BY_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
MODEL_CODE = Path(__file__).with_name("served_model.py")  # sets a ClassifierModel: nothing pickled
PACKAGE = Path(__file__).resolve().parents[1]  # the `classifier` package, logged as the model's code


def model_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """DEFAULT_SETTINGS updated with `overrides`, refusing unknown names."""
    unknown = sorted(set(overrides) - set(DEFAULT_SETTINGS))
    if unknown:
        raise UserError(f"{', '.join(unknown)}: unknown model settings; use {', '.join(DEFAULT_SETTINGS)}")
    return {**DEFAULT_SETTINGS, **overrides}


def image_source(value: Any, name: str = "image") -> bytes | Path | list[Path]:
    """Interpret one `image` cell: raw bytes, a base64 string (optionally a data URI), an existing file path, or a
    list of per-channel file paths (stacked as `prepare --channel-files` does); `name` says which cell in errors."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Path):
        return value
    if isinstance(value, list | tuple) and all(isinstance(part, str | Path) for part in value):
        return [Path(part) for part in value]
    if not isinstance(value, str):
        raise UserError(f"{name}: a {type(value).__name__}; pass image bytes, a base64 string or a file path")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    else:
        try:
            if Path(text).is_file():
                return Path(text)
        except OSError:  # a long base64 string is no valid file name
            pass
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UserError(f"{name}: {shown!r} is neither an existing image file nor base64 image bytes") from None


class ImageClassifier:
    """A network rebuilt from a checkpoint dict, with the preprocessing and decision rule it was trained with."""

    def __init__(
        self,
        checkpoint: dict[str, Any],
        tta: bool | None = None,
        inference_batch_size: int = 64,
        inference_device: str | None = None,
        decode_workers: int | None = None,
        dicom_window: list[float] | None = None,
        dicom_frame: int | None = None,
    ) -> None:
        self.classes: list[str] = [str(name) for name in checkpoint["classes"]]
        self.threshold: float | list[float] | None = checkpoint.get("threshold")
        self.threshold_rule = stored_threshold_rule(checkpoint)
        self.threshold_prevalence: float | list[float] | None = checkpoint.get("threshold_prevalence")
        self.multi_label = checkpoint.get("task") == "multi_label"
        self.positive = positive_index(self.classes, checkpoint.get("positive_class"), checkpoint.get("task"))
        self.encodings = from_plain(checkpoint.get("metadata"))
        preprocessing = checkpoint["preprocessing"]
        self.size = int(preprocessing["size"])
        self.channels = int(preprocessing["channels"])
        self.bit_depth = int(preprocessing["bit_depth"])
        self.resize_mode = str(preprocessing["resize"])
        stored = DicomSettings.from_plain(preprocessing.get("dicom"))  # as prepare read the training DICOMs
        self.dicom = DicomSettings(
            tuple(dicom_window) if dicom_window else stored.window,  # type: ignore[arg-type]
            stored.frame if dicom_frame is None else int(dicom_frame),
        )
        self.tta = uses_tta(checkpoint, tta)
        self.flips = checkpoint_flips(checkpoint)
        self.batch_size = int(inference_batch_size)
        self.pool = ThreadPoolExecutor(int(decode_workers or os.cpu_count() or 1), thread_name_prefix="decode")
        self.device = torch.device(inference_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network_from_checkpoint(checkpoint).to(self.device).eval()
        self.normalise = Normalise(preprocessing["mean"], preprocessing["std"]).to(self.device)

    @property
    def probability_columns(self) -> list[str]:
        return [f"prob_{name}" for name in self.classes]

    @property
    def columns(self) -> list[str]:
        return ["label", "confidence", *self.probability_columns, ERROR_COLUMN]

    @property
    def metadata_columns(self) -> list[str]:
        """The metadata columns the model takes beside each image (none for image-only models)."""
        return [encoding.name for encoding in self.encodings]

    def preprocess(self, source: bytes | Path | list[Path], name: str | None = None) -> torch.Tensor:
        """Decode one image (or stack its channel files) into the CxHxW tensor in [0, 1] that training reads
        (normalised per batch)."""
        if isinstance(source, list):
            image = open_channels(source, size=self.size, names=[str(path) for path in source])
        else:
            image = open_image(source, size=self.size, name=name, dicom=self.dicom)
        if self.channels == 4 and image_channels(image) != 4:  # an RGB(Y) model must not get a yellow-less image
            raise UserError(
                f"{name or source}: {image_channels(image)} channels, but the model takes 4; pass a 4-channel image "
                "(RGBA PNG or 4-page TIFF)"
            )
        image = normalise_mode(image, self.channels, self.bit_depth)
        image = resize(image, self.size, self.resize_mode)
        return image_to_tensor(image, self.bit_depth)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor, metadata: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities (softmax, or sigmoid for multi-label models) of a batch of preprocessed tensors and
        their encoded metadata rows, averaged over the training recipe's flips when TTA is on."""
        batch = self.normalise(batch.to(self.device))
        extra = None if metadata is None else torch.from_numpy(metadata).to(self.device)
        views = flips(batch, self.flips) if self.tta else [batch]
        outputs = [apply_model(self.network, view if extra is None else (view, extra)) for view in views]
        activated = [output.sigmoid() if self.multi_label else output.softmax(dim=1) for output in outputs]
        return torch.stack(activated).mean(dim=0).float().cpu().numpy()

    def encode_metadata(self, table: pd.DataFrame | None, where: str = "input") -> np.ndarray | None:
        """The model's encoded metadata for `table`'s rows (None for image-only models); missing columns fail."""
        if not self.encodings:
            return None
        return encode(pd.DataFrame() if table is None else table, self.encodings, where)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Predicted class indices: the stored threshold on the positive class for binary tasks, else argmax;
        multi-label models: a multi-hot row per image, each class at its own threshold. (The rule of
        `metrics.decisions`, kept here so that the served model needs no scikit-learn.)"""
        if self.multi_label:
            return (probabilities >= np.asarray(self.threshold if self.threshold is not None else 0.5)).astype(int)
        if self.threshold is not None and self.positive is not None:
            chosen = probabilities[:, self.positive] >= self.threshold
            return np.where(chosen, self.positive, 1 - self.positive)
        return probabilities.argmax(axis=1)

    @property
    def thresholds(self) -> dict[str, float]:
        """The decision threshold of each class it applies to: the positive class of a binary model with one,
        every class of a multi-label model (0.5 where none was tuned); empty for argmax models."""
        if self.multi_label:
            values = [0.5] * len(self.classes) if self.threshold is None else self.threshold
            return {name: float(value) for name, value in zip(self.classes, values, strict=True)}
        if self.threshold is not None and self.positive is not None:
            return {self.classes[self.positive]: float(self.threshold)}
        return {}

    @property
    def rule(self) -> str:
        """How `decide` picks the label, in words, with where its threshold(s) came from."""
        tuned = self.threshold_rule.describe()
        if self.multi_label:
            if self.threshold is None:
                return "every class with prob_<class> >= 0.5"
            return f"every class with prob_<class> >= threshold_<class> (thresholds for {tuned} on validation)"
        if self.thresholds:
            positive, negative = self.classes[self.positive], self.classes[1 - self.positive]
            tuned_on = "validation"
            if isinstance(self.threshold_prevalence, float):  # what mix of patients it was tuned on
                tuned_on += f", {self.threshold_prevalence:.0%} {positive}"
            return f"{positive} if prob_{positive} >= threshold, else {negative} (threshold for {tuned} on {tuned_on})"
        return "the class with the highest probability"

    @property
    def decision(self) -> dict[str, Any]:
        """The columns that show, beside each label, how it was decided: `threshold` (a binary model's, on its
        positive class; empty for argmax) or `threshold_<class>` (multi-label models), and `rule`."""
        if self.multi_label:
            columns = {f"threshold_{name}": value for name, value in self.thresholds.items()}
        else:
            columns = {"threshold": next(iter(self.thresholds.values()), None)}
        return {**columns, "rule": self.rule}

    def labels(self, probabilities: np.ndarray) -> list[str]:
        """The predicted label of each row: a class name, or (multi-label) the predicted classes space-separated."""
        chosen = self.decide(probabilities)
        if self.multi_label:
            return [" ".join(name for name, on in zip(self.classes, row, strict=True) if on) for row in chosen]
        return [self.classes[index] for index in chosen]

    def confidences(self, probabilities: np.ndarray) -> np.ndarray:
        """The probability of each row's predicted class. Multi-label: the lowest probability among the predicted
        classes, or 1 minus the highest probability where none is predicted (see the module docstring)."""
        chosen = self.decide(probabilities)
        if self.multi_label:
            weakest = np.where(chosen == 1, probabilities, np.inf).min(axis=1, initial=np.inf)
            return np.where(chosen.any(axis=1), weakest, 1.0 - probabilities.max(axis=1, initial=0.0))
        return probabilities[np.arange(len(probabilities)), chosen]

    def table(self, probabilities: np.ndarray, errors: list[str | None]) -> pd.DataFrame:
        """The output rows; rows with an error keep their place with a null label and NaN probabilities."""
        readable = np.array([error is None for error in errors], dtype=bool)
        all_probabilities = np.full((len(errors), len(self.classes)), np.nan)
        all_probabilities[readable] = probabilities
        labels: list[str | None] = [None] * len(errors)
        confidence = np.full(len(errors), np.nan)
        confidence[readable] = self.confidences(probabilities)
        for row, label in zip(np.flatnonzero(readable), self.labels(probabilities), strict=True):
            labels[row] = label
        table = pd.DataFrame(all_probabilities, columns=self.probability_columns)
        table.insert(0, "label", pd.Series(labels, dtype=object))
        table.insert(1, "confidence", confidence)
        table[ERROR_COLUMN] = pd.Series(errors, dtype=object)
        return table

    def read(self, values: list[Any], names: list[str]) -> list[tuple[torch.Tensor | None, str | None]]:
        """Each cell as a tensor, or why it cannot be read, decoded by the thread pool (`names` for the errors)."""
        return [future.result() for future in self.reading(values, names)]

    def reading(self, values: list[Any], names: list[str]) -> list[Future]:
        """`read`, started: the decode of each cell, under way in the thread pool."""
        return [self.pool.submit(self._read_one, value, name) for value, name in zip(values, names, strict=True)]

    def _decoding(self, images: list[Any], start: int) -> list[Future]:
        """The decode of the batch of `images` from `start` (none past the end), started."""
        batch = images[start : start + self.batch_size]
        return self.reading(batch, [f"row {position}" for position in range(start, start + len(batch))])

    def _read_one(self, value: Any, name: str) -> tuple[torch.Tensor | None, str | None]:
        try:
            source = image_source(value, name)
            return self.preprocess(source, name=None if isinstance(source, Path | list) else name), None
        except UserError as error:
            return None, error.message

    def predict(
        self, images: Iterable[Any], progress: bool = False, metadata: pd.DataFrame | None = None
    ) -> pd.DataFrame:
        """Predict a sequence of image cells (bytes, base64 strings, paths) in batches; errors stay in their row.

        `metadata` holds the metadata columns of the same rows, for models trained with metadata.
        """
        images = list(images)
        encoded = self.encode_metadata(metadata)
        tables = []
        decoding = self._decoding(images, 0)
        with progress_bar(total=len(images), unit="image", desc="predict", disable=not progress) as bar:
            for start in range(0, len(images), self.batch_size):
                read = [future.result() for future in decoding]
                decoding = self._decoding(images, start + self.batch_size)  # while the network runs on this batch
                tensors = [tensor for tensor, _ in read if tensor is not None]
                rows = [start + offset for offset, (tensor, _) in enumerate(read) if tensor is not None]
                extra = None if encoded is None else encoded[rows]
                probabilities = (
                    self.probabilities(torch.stack(tensors), extra) if tensors else np.empty((0, len(self.classes)))
                )
                tables.append(self.table(probabilities, [error for _, error in read]))
                bar.update(len(read))
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=self.columns)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: rebuilds an `ImageClassifier` from the logged checkpoint (no pickled nn.Module)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        checkpoint = read_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]))
        self.classifier = ImageClassifier(checkpoint, **model_settings(context.model_config or {}))

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        return self.classifier.predict(model_input[INPUT_COLUMN], metadata=model_input)


def load_classifier(model: str, **settings: Any) -> ImageClassifier:
    """The classifier in `model`: a checkpoint file, or an MLflow model URI (models:/NAME@ALIAS, runs:/ID/model,
    a model folder) of a model logged by `log_classifier_model`. `settings` (see DEFAULT_SETTINGS) left at None
    keep the model's own."""
    overrides = {key: value for key, value in settings.items() if value is not None}
    if Path(model).is_file():
        return ImageClassifier(read_checkpoint(Path(model)), **model_settings(overrides))
    if ":/" not in model and not Path(model).exists():
        raise UserError(
            f"{model}: no such checkpoint or model folder; pass one, or a URI such as models:/NAME@champion"
        )
    from classifier import tracking  # not at the top: the served model never tracks, nor needs tracking's packages

    tracking.connect()
    try:
        loaded = mlflow.pyfunc.load_model(model, model_config=overrides or None)
    except MlflowException as error:
        raise UserError(
            f"{model}: cannot load this model ({error.message.splitlines()[0]}); "
            "pass a checkpoint file or an MLflow model URI such as models:/NAME@champion"
        ) from error
    python_model = loaded.unwrap_python_model()
    if not isinstance(python_model, ClassifierModel):
        raise UserError(f"{model}: not a model logged by classifier training; pass one that was")
    return python_model.classifier


def model_signature(classes: list[str], metadata: list[dict[str, Any]] | None = None) -> ModelSignature:
    """Input: one string column of images (and the metadata columns, of any type);
    output: label, confidence, one probability per class, error."""
    outputs = [
        ColSpec(DataType.string, "label", required=False),
        ColSpec(DataType.double, "confidence", required=False),
        *(ColSpec(DataType.double, f"prob_{name}", required=False) for name in classes),
        ColSpec(DataType.string, ERROR_COLUMN, required=False),
    ]
    inputs = [ColSpec(DataType.string, INPUT_COLUMN)]
    # Any type: a client's ages may arrive as ints, floats or strings; the encoding reads each as a number or a missing
    # value, and a missing column fails with a message naming it.
    inputs += [ColSpec(AnyType(), encoding.name, required=False) for encoding in from_plain(metadata)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def example_input(preprocessing: dict[str, Any], metadata: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """A one-row input: a mid-grey PNG of the trained size and mode, base64-encoded as a client would send it, and
    typical metadata values (the training mean, the first category)."""
    size = int(preprocessing["size"])
    if int(preprocessing["channels"]) == 1 and int(preprocessing["bit_depth"]) == 16:
        image = Image.fromarray(np.full((size, size), 32768, dtype=np.uint16))
    else:
        image = Image.new(MODES_BY_CHANNELS[int(preprocessing["channels"])], (size, size), "grey")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    example: dict[str, list[Any]] = {INPUT_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]}
    for encoding in from_plain(metadata):
        example[encoding.name] = [encoding.mean if encoding.kind == "numeric" else (encoding.categories or [""])[0]]
    return pd.DataFrame(example)


def serving_requirements() -> list[str]:
    """Pinned versions of what the served model imports (classifier itself travels as code in the model)."""
    requirements = []
    for package in SERVING_PACKAGES:
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def log_classifier_model(checkpoint: Path, name: str = "model", **log_kwargs: Any) -> ModelInfo:
    """Log `checkpoint` as a self-contained pyfunc model (into the active run, if any) and return its ModelInfo.

    Only the inference keys of the checkpoint are stored (no optimizer state). `log_kwargs` go to
    `mlflow.pyfunc.log_model` (e.g. `registered_model_name`, `model_config={"tta": True}`, `params`, `tags`).
    """
    state = read_checkpoint(Path(checkpoint))
    settings = model_settings(log_kwargs.pop("model_config", {}))
    settings["tta"] = uses_tta(state, settings["tta"])  # None: as it was trained (its run's param `tta`)
    threshold = state.get("threshold")
    shown = [threshold] if isinstance(threshold, float | int) else threshold or []
    params = {
        "architecture": str(state["architecture"]),
        "decision_threshold": ",".join(f"{value:.6g}" for value in shown) or "none",
        "threshold_rule": str(stored_threshold_rule(state)) if shown else "none",
        "tta": str(settings["tta"]),
        **log_kwargs.pop("params", {}),
    }
    metadata = {
        "classes": list(state["classes"]),
        "threshold": threshold,
        "threshold_rule": str(stored_threshold_rule(state)) if shown else None,
        "threshold_prevalence": state.get("threshold_prevalence"),
        "positive_class": state.get("positive_class"),
        "temperature": state.get("temperature"),
        **log_kwargs.pop("metadata", {}),
    }
    # MLflow checks the input example by loading the model back: an INFO line and a "Downloading artifacts" bar of
    # a local copy on every training run, nothing a user can act on
    quiet = hushed("mlflow.pyfunc", environment={"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    with tempfile.TemporaryDirectory() as folder, quiet:
        slim = Path(folder) / "checkpoint.pt"
        torch.save({key: state[key] for key in KEPT_KEYS if key in state}, slim)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(slim)},
            code_paths=[str(PACKAGE)],
            signature=model_signature(metadata["classes"], state.get("metadata")),
            input_example=example_input(state["preprocessing"], state.get("metadata")),
            pip_requirements=serving_requirements(),
            model_config=settings,
            metadata=metadata,
            params=params,
            **log_kwargs,
        )
