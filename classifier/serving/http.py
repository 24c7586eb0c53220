"""`classifier serve`: a FastAPI service around a trained model; POST image files to /predict, one to /explain
(its Grad-CAM overlay); docs at /docs."""

from __future__ import annotations

import base64
import copy
import json
import threading
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from classifier import __version__
from classifier.errors import UserError
from classifier.model.gradcam import class_index, explain_images, png_bytes
from classifier.model.pyfunc import ImageClassifier, load_classifier

DEFAULT_MAX_UPLOAD_MB = 20.0
READ_CHUNK = 1 << 20


class FilePrediction(BaseModel):
    """One uploaded file: its predicted class (multi-label: the predicted classes, space-separated), that class's
    probability (multi-label: the lowest among the predicted classes), the decision threshold of each class it
    applies to (the positive class of a binary model, every class of a multi-label one; empty for argmax), the
    rule that chose the label, and every class's probability."""

    file: str
    label: str
    confidence: float
    threshold: dict[str, float]
    rule: str
    probabilities: dict[str, float]


class Predictions(BaseModel):
    """One prediction per uploaded file, in upload order."""

    predictions: list[FilePrediction]


class FileExplanation(BaseModel):
    """Grad-CAM of one uploaded file: the class explained, its probability, the predicted label and the overlay."""

    file: str
    label: str
    explained_class: str
    probability: float
    probabilities: dict[str, float]
    overlay_png_base64: str


class UploadError(BaseModel):
    """Why the request was rejected, and which file caused it."""

    detail: str
    file: str


class Health(BaseModel):
    """The service is up, and what it serves."""

    status: str
    model: str
    classes: list[str]
    threshold: float | list[float] | None
    tta: bool
    metadata_columns: list[str]


class RejectedUpload(Exception):
    """An upload the service refuses; answered as a 4xx `UploadError`."""

    def __init__(self, status_code: int, file: str, detail: str) -> None:
        super().__init__(detail)
        self.status_code, self.file, self.detail = status_code, file, detail


def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refusing (413) one larger than `max_bytes` (read no further than the limit)."""
    content = bytearray()
    while chunk := upload.file.read(READ_CHUNK):
        content += chunk
        if len(content) > max_bytes:
            raise RejectedUpload(
                413, upload.filename, f"{upload.filename}: larger than the {max_bytes / 1e6:g} MB upload limit"
            )
    return bytes(content)


def create_app(classifier: ImageClassifier, model: str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> FastAPI:
    """The service: one classifier loaded once, shared by all requests."""
    app = FastAPI(
        title="classifier",
        version=__version__,
        description=f"Image classification with {model}: classes {', '.join(classifier.classes)}.",
    )
    max_bytes = int(max_upload_mb * 1e6)
    rejections = {
        413: {"model": UploadError, "description": "An upload exceeds the size limit"},
        415: {"model": UploadError, "description": "An upload is not an image, or of an unsupported mode"},
    }

    @app.exception_handler(RejectedUpload)
    def rejected(_request: Request, error: RejectedUpload) -> JSONResponse:
        return JSONResponse(status_code=error.status_code, content={"detail": error.detail, "file": error.file})

    @app.get("/health")
    def health() -> Health:
        """Liveness and what is being served."""
        return Health(
            status="ok",
            model=model,
            classes=classifier.classes,
            threshold=classifier.threshold,
            tta=classifier.tta,
            metadata_columns=classifier.metadata_columns,
        )

    @app.post("/predict", responses=rejections)
    def predict(
        files: Annotated[list[UploadFile], File(description="One or more image files")],
        metadata: Annotated[
            str | None,
            Form(description="Models with metadata inputs: a JSON object of them, or a list of one per file"),
        ] = None,
    ) -> Predictions:
        """Label each uploaded image. One unreadable or oversized file rejects the request (4xx naming it)."""
        extra = read_metadata(classifier, metadata, [upload.filename for upload in files])
        contents = [read_upload(upload, max_bytes) for upload in files]
        read = classifier.read(contents, [upload.filename for upload in files])
        for upload, (_, error) in zip(files, read, strict=True):
            if error is not None:
                raise RejectedUpload(415, upload.filename, error)
        tensors = [tensor for tensor, _ in read]
        size = classifier.batch_size
        batches = torch.stack(tensors).split(size)
        rows = [None if extra is None else extra[start : start + size] for start in range(0, len(tensors), size)]
        probabilities = np.concatenate(
            [classifier.probabilities(batch, row) for batch, row in zip(batches, rows, strict=True)]
        )
        return Predictions(
            predictions=[
                FilePrediction(
                    file=upload.filename,
                    label=label,
                    confidence=float(confidence),
                    threshold=classifier.thresholds,
                    rule=classifier.rule,
                    probabilities=dict(zip(classifier.classes, row.tolist(), strict=True)),
                )
                for upload, row, label, confidence in zip(
                    files,
                    probabilities,
                    classifier.labels(probabilities),
                    classifier.confidences(probabilities),
                    strict=True,
                )
            ]
        )

    explaining, explainer = threading.Lock(), []  # Grad-CAM's network: a copy made on the first /explain

    @app.post(
        "/explain",
        responses={**rejections, 200: {"content": {"image/png": {}}, "description": "The overlay PNG, or JSON"}},
    )
    def explain(
        file: Annotated[UploadFile, File(description="One image file")],
        target_class: Annotated[str | None, Form(description="Class to explain [the predicted one]")] = None,
        format: Annotated[str, Form(description="png (the overlay) or json (base64 overlay and scores)")] = "png",
        metadata: Annotated[str | None, Form(description="Models with metadata inputs: a JSON object")] = None,
    ) -> Response:
        """Grad-CAM heat map of one uploaded image over it: where the model looked for the class."""
        if format not in ("png", "json"):
            raise RejectedUpload(422, "format", f"format={format}: use png or json")
        if target_class is not None:
            try:
                class_index(classifier.classes, target_class)
            except UserError as error:
                raise RejectedUpload(422, "target_class", error.message) from None
        extra = read_metadata(classifier, metadata, [file.filename])
        ((tensor, error),) = classifier.read([read_upload(file, max_bytes)], [file.filename])
        if error is not None:
            raise RejectedUpload(415, file.filename, error)
        with explaining:  # one explanation at a time through the hooked copy; /predict keeps the original
            if not explainer:
                explainer.append(copy.deepcopy(classifier.network))
            (explanation,) = explain_images(classifier, [tensor], target_class, extra, explainer[0])
        image = png_bytes(explanation.overlay)
        if format == "png":
            return Response(image, media_type="image/png")
        body = FileExplanation(
            file=file.filename,
            label=classifier.labels(explanation.probabilities[None])[0],
            explained_class=classifier.classes[explanation.target],
            probability=float(explanation.probabilities[explanation.target]),
            probabilities=dict(zip(classifier.classes, explanation.probabilities.tolist(), strict=True)),
            overlay_png_base64=base64.b64encode(image).decode("ascii"),
        )
        return JSONResponse(body.model_dump())

    return app


def read_metadata(classifier: ImageClassifier, text: str | None, files: list[str]) -> np.ndarray | None:
    """The encoded metadata of each uploaded file from the `metadata` form field (422 naming what is wrong)."""
    if not classifier.metadata_columns:
        return None
    where = ", ".join(classifier.metadata_columns)
    try:
        values = json.loads(text) if text else None
    except json.JSONDecodeError as error:
        raise RejectedUpload(422, "metadata", f"metadata: not JSON ({error.msg}); send an object of {where}") from None
    rows = [values] * len(files) if isinstance(values, dict) else values
    if not isinstance(rows, list) or len(rows) != len(files) or not all(isinstance(row, dict) for row in rows):
        raise RejectedUpload(
            422, "metadata", f"metadata: send a JSON object of {where}, or a list of one object per uploaded file"
        )
    try:
        return classifier.encode_metadata(pd.DataFrame(rows), "metadata")
    except UserError as error:
        raise RejectedUpload(422, "metadata", error.message) from None


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    batch_size: int | None = None,
    tta: bool | None = None,
    device: str | None = None,
    workers: int | None = None,
    dicom_window: list[float] | None = None,
    dicom_frame: int | None = None,
) -> None:
    """Load `model` (checkpoint file or MLflow model URI) and serve it until interrupted."""
    if max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb={max_upload_mb}: must be positive")
    classifier = load_classifier(
        model,
        tta=tta,
        inference_batch_size=batch_size,
        inference_device=device,
        decode_workers=workers,
        dicom_window=dicom_window,
        dicom_frame=dicom_frame,
    )
    uvicorn.run(create_app(classifier, model, max_upload_mb), host=host, port=port)
