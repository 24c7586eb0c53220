"""`classifier serve`: a FastAPI service around a trained model; POST image files to /predict, docs at /docs."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from classifier import __version__
from classifier.errors import UserError
from classifier.pyfunc import ImageClassifier, load_classifier

DEFAULT_MAX_UPLOAD_MB = 20.0
READ_CHUNK = 1 << 20


class FilePrediction(BaseModel):
    """One uploaded file: its predicted class, that class's probability and every class's."""

    file: str
    label: str
    confidence: float
    probabilities: dict[str, float]


class Predictions(BaseModel):
    """One prediction per uploaded file, in upload order."""

    predictions: list[FilePrediction]


class UploadError(BaseModel):
    """Why the request was rejected, and which file caused it."""

    detail: str
    file: str


class Health(BaseModel):
    """The service is up, and what it serves."""

    status: str
    model: str
    classes: list[str]
    threshold: float | None
    tta: bool


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
            status="ok", model=model, classes=classifier.classes, threshold=classifier.threshold, tta=classifier.tta
        )

    @app.post("/predict", responses=rejections)
    def predict(files: Annotated[list[UploadFile], File(description="One or more image files")]) -> Predictions:
        """Label each uploaded image. One unreadable or oversized file rejects the request (4xx naming it)."""
        contents = [read_upload(upload, max_bytes) for upload in files]
        read = classifier.read(contents, [upload.filename for upload in files])
        for upload, (_, error) in zip(files, read, strict=True):
            if error is not None:
                raise RejectedUpload(415, upload.filename, error)
        tensors = [tensor for tensor, _ in read]
        batches = torch.stack(tensors).split(classifier.batch_size)
        probabilities = np.concatenate([classifier.probabilities(batch) for batch in batches])
        chosen = classifier.decide(probabilities)
        return Predictions(
            predictions=[
                FilePrediction(
                    file=upload.filename,
                    label=classifier.classes[index],
                    confidence=float(row[index]),
                    probabilities=dict(zip(classifier.classes, row.tolist(), strict=True)),
                )
                for upload, row, index in zip(files, probabilities, chosen, strict=True)
            ]
        )

    return app


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
) -> None:
    """Load `model` (checkpoint file or MLflow model URI) and serve it until interrupted."""
    if max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb={max_upload_mb}: must be positive")
    classifier = load_classifier(
        model, tta=tta, inference_batch_size=batch_size, inference_device=device, decode_workers=workers
    )
    uvicorn.run(create_app(classifier, model, max_upload_mb), host=host, port=port)
