"""embed(config, model, data): penultimate-layer embeddings of a split and their 2-D t-SNE map, logged to MLflow."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from torch import nn
from torch.utils.data import DataLoader

from classifier import tracking
from classifier.config import EmbedConfig
from classifier.console import progress
from classifier.errors import UserError
from classifier.learn.device import amp_dtype, resolve_device
from classifier.learn.inference import checkpoint_and_split, checkpoint_loader
from classifier.measure.plots import tsne_png
from classifier.nets.ensemble import ENSEMBLE
from classifier.nets.models import MetadataFusion, SimpleCNN

ARTIFACTS = "embeddings"


@dataclass
class EmbeddingResult:
    """The embed run; every image's embedding (rows as in `paths`); the t-SNE `points` of the sampled `rows` and
    the silhouette score of their embeddings by class."""

    run_id: str
    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str]
    rows: np.ndarray
    points: np.ndarray
    silhouette: float | None = None  # of the sampled rows' embeddings by class; None with one class


def embed(config: EmbedConfig, model: str, data: Path) -> EmbeddingResult:
    """Embed every image of `config.split` of `data` with `model` (checkpoint file, run id or model URI), map a
    stratified sample of at most `config.max_images` to 2-D with t-SNE, and log both and the plot in one run."""
    data = Path(data)
    info, checkpoint, arrays = checkpoint_and_split(model, data, config.split)
    if checkpoint["architecture"] == ENSEMBLE:  # members differ in width and kind: no one penultimate layer
        members = [str(member["source"]) for member in checkpoint["config"]["members"]]
        raise UserError(
            f"embed: the model is an ensemble of {len(members)} members ({', '.join(members)}); "
            "embed one member at a time (its run id or checkpoint)"
        )
    if len(arrays.labels) < 2:
        raise UserError(f"{data}: the {config.split} split has one image; t-SNE needs 2 or more, pick another split")
    device = resolve_device(config.device)
    network, loader, inputs = checkpoint_loader(checkpoint, arrays, config.batch_size, device)
    embeddings = embed_loader(network, loader, inputs, amp_dtype("auto", device))
    labels = colour_labels(arrays.labels)
    rows = stratified_sample(labels, config.max_images, config.seed)
    perplexity = min(config.perplexity, len(rows) - 1.0)  # sklearn requires perplexity < number of points
    tsne = TSNE(perplexity=perplexity, init="pca", random_state=config.seed)
    points = tsne.fit_transform(embeddings[rows]).astype(np.float32)
    metrics = {
        "images": len(arrays.labels),
        "tsne_images": len(rows),
        "embedding_width": embeddings.shape[1],
        "tsne_kl_divergence": float(tsne.kl_divergence_),
    }
    if 2 <= len(np.unique(labels[rows])) < len(rows):
        metrics["embedding_silhouette"] = float(silhouette_score(embeddings[rows], labels[rows]))
    silhouette = metrics.get("embedding_silhouette")
    tags = {"classifier.command": "embed", "classifier.embedded_model": model, "classifier.data": str(data.resolve())}
    with tracking.start_run(config.experiment, f"embed-{config.split}", tags):
        tracking.log_params(
            {
                "embedded_model": model,
                "embedded_split": config.split,
                "data_fingerprint": info.fingerprint,
                "tsne_perplexity": perplexity,
                "tsne_max_images": config.max_images,
                "tsne_seed": config.seed,
            }
        )
        tracking.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as scratch:
            shows = f"{config.split} split, model {model}"
            write_embeddings(
                Path(scratch), embeddings, labels, arrays.paths, info.classes, rows, points, shows, silhouette
            )
            tracking.log_artifacts(Path(scratch), ARTIFACTS)
        run_id = tracking.active_run_id()
    return EmbeddingResult(run_id, embeddings, labels, arrays.paths, rows, points, silhouette)


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """The class each image is coloured (and stratified) by: its class, or for multi-label data its first class
    (the lowest index; images without any class count as the first class)."""
    return labels.argmax(axis=1) if labels.ndim == 2 else labels


def embed_batch(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """What the classifier head sees for a normalised batch (pre-logits), one row per image; `inputs` are images,
    or images and metadata for a `MetadataFusion` network."""
    if isinstance(model, MetadataFusion):
        return model.forward_features(*inputs)
    if isinstance(model, SimpleCNN):
        return model.features(inputs)
    return model.forward_head(model.forward_features(inputs), pre_logits=True).flatten(1)


def embed_loader(
    model: nn.Module, loader: DataLoader, inputs: Callable[[Any], Any], amp: torch.dtype | None = None
) -> np.ndarray:
    """float32 embeddings of every batch of `loader` (its inputs prepared by `inputs`), with a progress bar."""
    model.eval()
    device = next(model.parameters()).device
    batches = []
    with torch.inference_mode():
        for batch, _ in progress(loader, desc="embedding", unit="batch"):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                batches.append(embed_batch(model, inputs(batch)).float().cpu())
    return torch.cat(batches).numpy()


def stratified_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted rows of at most `limit` images, each class in proportion to its share, drawn by `seed`."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    position = np.empty(len(labels))  # where an image falls in its shuffled class, from 0 to 1
    for label in np.unique(labels):
        members = order[labels[order] == label]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(order[np.argsort(position[order], kind="stable")[:limit]])


def write_embeddings(
    folder: Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    classes: list[str],
    rows: np.ndarray,
    points: np.ndarray,
    shows: str = "",
    silhouette: float | None = None,
) -> None:
    """embeddings.npz (every image), embeddings.csv (path, label, tsne_x, tsne_y of the mapped ones), tsne.png
    (titled with what it `shows` and the `silhouette` score)."""
    np.savez_compressed(
        folder / "embeddings.npz",
        embeddings=embeddings,
        labels=labels,
        paths=np.array(paths, dtype=str),
        classes=np.array(classes, dtype=str),
    )
    table = pd.DataFrame(
        {
            "path": [paths[row] for row in rows],
            "label": [classes[label] for label in labels[rows]],
            "tsne_x": points[:, 0],
            "tsne_y": points[:, 1],
        }
    )
    table.to_csv(folder / "embeddings.csv", index=False)
    tsne_png(folder / "tsne.png", points, labels[rows], classes, shows, silhouette)
