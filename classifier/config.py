"""Experiment YAML + command-line overrides -> one typed, validated config object per command."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from classifier.data.images import RESIZE_MODES
from classifier.errors import UserError

Config = TypeVar("Config")


@dataclasses.dataclass
class PrepareConfig:
    """How `classifier prepare` turns a source into a dataset (the `prepare:` section of an experiment YAML)."""

    experiment: str = "classifier"
    size: int = 256
    resize: str = "stretch"
    channels: int | None = None
    bit_depth: int | None = None
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.8, 0.1, 0.1])
    folds: int | None = None
    seed: int = 42
    path_column: str = "path"
    label_column: str = "label"
    group_column: str | None = None
    class_names: list[str] | None = None
    multi_label: bool = False
    channel_files: list[str] | None = None
    workers: int | None = None
    skip_invalid: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not 1 <= self.size <= 8192:
            raise UserError(f"prepare: option 'size' must be 1..8192 pixels, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise UserError(f"prepare: option 'resize' must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.channels not in (None, 1, 3, 4):
            raise UserError(f"prepare: option 'channels' must be 1 (grey), 3 (RGB) or 4 (RGBA), got {self.channels}")
        if self.bit_depth not in (None, 8, 16) or (self.bit_depth == 16 and self.channels not in (None, 1)):
            raise UserError(f"prepare: option 'bit_depth' must be 8, or 16 for grey images, got {self.bit_depth}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise UserError(
                f"prepare: option 'fractions' must be 3 non-negative numbers (training, validation, test) summing "
                f"to 1, got {','.join(map(str, self.fractions))}"
            )
        if self.fractions[0] == 0:
            raise UserError("prepare: option 'fractions' must give the training split a share above 0")
        if self.folds is not None and self.folds < 2:
            raise UserError(f"prepare: option 'folds' must be at least 2, got {self.folds}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"prepare: option 'workers' must be at least 1, got {self.workers}")
        if self.channel_files is not None and len(self.channel_files) not in (3, 4):
            raise UserError(
                f"prepare: option 'channel_files' must name 3 or 4 channels (e.g. red,green,blue,yellow), "
                f"got {','.join(self.channel_files)}"
            )

    @property
    def split_fractions(self) -> dict[str, float]:
        return dict(zip(("training", "validation", "test"), self.fractions, strict=True))


def load_section(path: Path | None, section: str) -> dict[str, Any]:
    """Return the `section:` mapping of an experiment YAML (empty when no file is given)."""
    if path is None:
        return {}
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise UserError(f"{path}: cannot read config ({error.strerror}); pass an existing YAML file") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]}); fix the file") from error
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a mapping of sections (prepare:, train:, search:) at the top level")
    values = document.get(section) or {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: section '{section}' must be a mapping of option: value")
    return values


def build_config(cls: type[Config], *sources: dict[str, Any], origin: str = "config") -> Config:
    """Merge mappings (later ones win, None values ignored) into dataclass `cls`, checking names and types."""
    names = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(names))}"
                raise UserError(f"{origin}: unknown option '{key}'{hint}")
            if value is not None:
                values[key] = _coerce(value, hints[key], f"{origin}: option '{key}'")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _coerce(value: Any, hint: Any, what: str) -> Any:
    """Convert YAML/CLI values to the annotated type (int, float, bool, str, Path, lists, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _coerce(value, option, what)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, list | tuple):
            raise UserError(f"{what} must be a list, got {value!r}")
        return [_coerce(part, item, what) for part in value]
    if origin is dict or hint is Any:
        return value
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError) as error:
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{what} must be of type {name}, got {value!r}") from error


SEARCH_SAMPLERS = ("tpe", "random")
PRUNERS = ("none", "median", "hyperband")


def default_search_space() -> dict[str, Any]:
    """What `classifier search` tunes when the experiment YAML declares no `search.space`."""
    return {
        "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128]},
        "augment": {"type": "categorical", "choices": ["none", "light", "strong"]},
    }


@dataclasses.dataclass
class SearchConfig:
    """How `classifier search` runs an Optuna study over `fit` (the `search:` section of an experiment YAML)."""

    study_name: str | None = None
    storage: str | None = None
    n_trials: int = 20
    timeout: float | None = None
    n_workers: int = 1
    threads_per_worker: int | None = None
    metric: str = "auto"
    cv_folds: int | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    startup_trials: int = 3
    prune_warmup_epochs: int = 1
    seed: int = 0
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 2
    register_as: str | None = None
    space: dict[str, Any] = dataclasses.field(default_factory=default_search_space)

    def validate(self) -> None:
        for name in ("n_trials", "n_workers", "heartbeat_interval", "startup_trials", "max_retry"):
            minimum = 0 if name in ("startup_trials", "max_retry") else 1
            if getattr(self, name) < minimum:
                raise UserError(f"search: option '{name}' must be >= {minimum}, got {getattr(self, name)}")
        for name in ("timeout", "threads_per_worker", "cv_folds", "grace_period"):
            value = getattr(self, name)
            if value is not None and value <= (1 if name == "cv_folds" else 0):
                raise UserError(f"search: option '{name}' must be {'>= 2' if name == 'cv_folds' else '> 0'}")
        if self.sampler not in SEARCH_SAMPLERS:
            raise UserError(f"search: unknown sampler '{self.sampler}'; use one of {', '.join(SEARCH_SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"search: unknown pruner '{self.pruner}'; use one of {', '.join(PRUNERS)}")
        if not isinstance(self.space, dict) or not self.space:
            raise UserError("search: 'space' must be a non-empty mapping of parameter: {type, ...}")


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "none")
LOSSES = ("cross_entropy", "focal")
TRAIN_SAMPLERS = ("random", "weighted")
AUGMENTATIONS = ("none", "light", "strong")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
CACHE_MODES = ("auto", "memory", "memmap")


@dataclasses.dataclass
class TrainConfig:
    """How `classifier train` / `cv` fit one model (the `train:` section of an experiment YAML)."""

    experiment: str = "classifier"
    model: str = "simple_cnn"
    pretrained: bool = False
    weights: Path | None = None
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    plateau_patience: int = 2
    freeze_epochs: int = 0
    backbone_lr_scale: float = 0.1
    loss: str = "cross_entropy"
    focal_gamma: float = 2.0
    class_weights: bool = False
    sampler: str = "random"
    label_smoothing: float = 0.0
    target_recall: float | None = None
    augment: str = "light"
    progressive_sizes: list[int] | None = None
    metadata: list[str] | None = None
    amp: str = "auto"
    channels_last: bool = False
    device: str = "auto"
    seed: int = 42
    monitor: str = "auto"
    patience: int = 0
    cache: str = "auto"
    num_workers: int | None = None
    output_dir: Path = Path("outputs")
    resume: str | None = None
    system_metrics: bool = True

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise UserError(f"train: option '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "backbone_lr_scale", "gamma"):
            if getattr(self, name) <= 0:
                raise UserError(f"train: option '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "momentum", "warmup_epochs", "freeze_epochs", "patience", "focal_gamma"):
            if getattr(self, name) < 0:
                raise UserError(f"train: option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"train: option 'num_workers' must be >= 0, got {self.num_workers}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"train: option 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise UserError(f"train: option 'target_recall' must be in (0, 1], e.g. 0.95, got {self.target_recall}")
        if self.progressive_sizes is not None and (
            not self.progressive_sizes or min(self.progressive_sizes) < 8 or len(self.progressive_sizes) > self.epochs
        ):
            raise UserError(
                f"train: option 'progressive_sizes' must be 1 to 'epochs' ({self.epochs}) image sizes of at least "
                f"8 px, e.g. 128,224; got {self.progressive_sizes}"
            )
        if self.freeze_epochs and self.freeze_epochs >= self.epochs:
            raise UserError(f"train: 'freeze_epochs' ({self.freeze_epochs}) must be below 'epochs' ({self.epochs})")
        choices = {
            "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS,
            "loss": LOSSES,
            "sampler": TRAIN_SAMPLERS,
            "augment": AUGMENTATIONS,
            "amp": AMP_MODES,
            "device": DEVICES,
            "cache": CACHE_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"train: unknown {name} '{getattr(self, name)}'; use one of {', '.join(allowed)}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"train: weights file {self.weights} does not exist; pass the path of a saved state_dict")


@dataclasses.dataclass
class EvaluateConfig:
    """How `classifier evaluate` scores a trained model on a prepared split."""

    experiment: str = "classifier"
    split: str = "test"
    tta: bool = False
    bootstrap: int = 1000
    batch_size: int = 256
    device: str = "auto"
    seed: int = 42

    def validate(self) -> None:
        if self.split not in ("training", "validation", "test"):
            raise UserError(f"evaluate: unknown split '{self.split}'; use training, validation or test")
        if self.batch_size < 1:
            raise UserError(f"evaluate: option 'batch_size' must be >= 1, got {self.batch_size}")
        if self.bootstrap < 0:
            raise UserError(f"evaluate: option 'bootstrap' must be >= 0 (0 turns it off), got {self.bootstrap}")
        if self.device not in DEVICES:
            raise UserError(f"evaluate: unknown device '{self.device}'; use one of {', '.join(DEVICES)}")


@dataclasses.dataclass
class EmbedConfig:
    """How `classifier embed` maps a trained model's penultimate-layer embeddings of a split (the `embed:` section)."""

    experiment: str = "classifier"
    split: str = "validation"
    batch_size: int = 256
    device: str = "auto"
    perplexity: float = 30.0
    max_images: int = 2000
    seed: int = 42

    def validate(self) -> None:
        if self.split not in ("training", "validation", "test"):
            raise UserError(f"embed: unknown split '{self.split}'; use training, validation or test")
        if self.batch_size < 1:
            raise UserError(f"embed: option 'batch_size' must be >= 1, got {self.batch_size}")
        if self.perplexity <= 0:
            raise UserError(f"embed: option 'perplexity' must be > 0 (typically 5 to 50), got {self.perplexity}")
        if self.max_images < 2:
            raise UserError(f"embed: option 'max_images' must be >= 2 (images in the t-SNE), got {self.max_images}")
        if self.device not in DEVICES:
            raise UserError(f"embed: unknown device '{self.device}'; use one of {', '.join(DEVICES)}")


@dataclasses.dataclass
class EnsembleConfig:
    """How `classifier ensemble` averages trained models (the `ensemble:` section of an experiment YAML)."""

    experiment: str = "classifier"
    study: str | None = None
    storage: str | None = None
    top_k: int = 3
    runs: list[str] | None = None
    split: str = "test"
    target_recall: float | None = None
    register_as: str | None = None
    batch_size: int = 256
    device: str = "auto"

    def validate(self) -> None:
        if (self.study is None) == (self.runs is None):
            raise UserError("ensemble: pass either --study NAME (its top trials) or --runs ID,ID,... , not both")
        if self.top_k < 2:
            raise UserError(f"ensemble: option 'top_k' must be >= 2 (members to average), got {self.top_k}")
        if self.runs is not None and len(self.runs) < 2:
            raise UserError(f"ensemble: needs at least 2 members, got {len(self.runs)} in --runs; pass 2 or more")
        if self.runs is not None and len(set(self.runs)) < len(self.runs):
            raise UserError("ensemble: --runs names a run twice; pass each member once")
        if self.split not in ("training", "validation", "test"):
            raise UserError(f"ensemble: unknown split '{self.split}'; use training, validation or test")
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise UserError(f"ensemble: option 'target_recall' must be in (0, 1], e.g. 0.95, got {self.target_recall}")
        if self.batch_size < 1:
            raise UserError(f"ensemble: option 'batch_size' must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise UserError(f"ensemble: unknown device '{self.device}'; use one of {', '.join(DEVICES)}")
