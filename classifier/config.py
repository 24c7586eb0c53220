"""Experiment YAML + command-line overrides -> one typed, validated config object per command."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from classifier.errors import UserError

RESIZE_MODES = ("stretch", "pad", "crop")  # how prepare fits an image to --size

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
    positive_class: str | None = None
    multi_label: bool = False
    channel_files: list[str] | None = None
    window: list[float] | None = None
    frame: int | None = None
    group_tag: str | None = None
    keep_tags: bool = False
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
        check_dicom_settings("prepare", self.window, self.frame)
        if self.group_tag is not None and self.group_column is not None:
            raise UserError("prepare: pass either 'group_column' (a CSV column) or 'group_tag' (a DICOM tag), not both")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            repeated = sorted({name for name in self.class_names if self.class_names.count(name) > 1})
            raise UserError(f"prepare: option 'class_names' names {', '.join(repeated)} more than once")
        if self.channel_files is not None and len(self.channel_files) not in (3, 4):
            raise UserError(
                f"prepare: option 'channel_files' must name 3 or 4 channels (e.g. red,green,blue,yellow), "
                f"got {','.join(self.channel_files)}"
            )

    @property
    def split_fractions(self) -> dict[str, float]:
        return dict(zip(("training", "validation", "test"), self.fractions, strict=True))


THRESHOLD_RULE_NAMES = ("max_f1", "youden", "balanced", "recall", "specificity")
DEFAULT_THRESHOLD_RULE = "youden"


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """How a binary (or per-class multi-label) decision threshold is chosen on validation probabilities: `max_f1`,
    `youden` (maximum sensitivity + specificity), `balanced` (sensitivity = specificity), `recall:R` (the most
    precise threshold reaching recall R) or `specificity:S` (the most sensitive one reaching specificity S)."""

    name: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str, where: str = "option 'threshold_rule'") -> ThresholdRule:
        name, _, target = str(text).strip().partition(":")
        usage = "use max_f1, youden, balanced, recall:R or specificity:S (e.g. recall:0.95)"
        if name not in THRESHOLD_RULE_NAMES or bool(target) != (name in ("recall", "specificity")):
            raise UserError(f"{where}: unknown threshold rule {text!r}; {usage}")
        if not target:
            return cls(name)
        try:
            value = float(target)
        except ValueError:
            raise UserError(f"{where}: {text!r} needs a number after '{name}:'; {usage}") from None
        if not 0 < value <= 1:
            raise UserError(f"{where}: {name} in {text!r} must be in (0, 1], e.g. {name}:0.95")
        return cls(name, value)

    def __str__(self) -> str:
        return self.name if self.target is None else f"{self.name}:{self.target:g}"

    def describe(self) -> str:
        """The rule in words, as the served model's `rule` column shows it."""
        words = {
            "max_f1": "max F1",
            "youden": "max sensitivity + specificity",
            "balanced": "sensitivity = specificity",
        }
        return words.get(self.name) or f"{self.name} {self.target:g}"


def check_dicom_settings(command: str, window: list[float] | None, frame: int | None) -> None:
    """A DICOM window is a centre and a width above 0; a frame index is 0 or more."""
    if window is not None and (len(window) != 2 or window[1] <= 0):
        raise UserError(
            f"{command}: option 'window' must be CENTRE,WIDTH, the width above 0 (e.g. 40,400); got {window}"
        )
    if frame is not None and frame < 0:
        raise UserError(f"{command}: option 'frame' must be 0 or more (the first frame is 0), got {frame}")


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
        if hint is str and isinstance(value, bool):  # YAML's `true` for a choice such as data_on_device
            return "true" if value else "false"
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError) as error:
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{what} must be of type {name}, got {value!r}") from error


SEARCH_SAMPLERS = ("tpe", "gp", "random")
PRUNERS = ("auto", "none", "median", "hyperband")
REFITS = ("auto", "none", "folds", "full")
DEFAULT_TRIALS = 20  # a study's size when neither --n-trials nor --budget says otherwise
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, where: str) -> float:
    """Seconds in a duration such as `1h`, `90m`, `2h30m` or `45s` (a bare number is seconds)."""
    text = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)([smhd]))+|\d+(?:\.\d+)?", text)
    if not parts:
        raise UserError(f"{where}: {text!r} is not a duration; write e.g. 1h, 90m, 2h30m or 45s")
    if text.replace(".", "", 1).isdigit():
        return float(text)
    return sum(float(value) * DURATION_UNITS[unit] for value, unit in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))


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
    n_trials: int | None = None
    timeout: float | None = None
    budget: str | None = None
    fit_epochs_to_budget: bool = True  # with a budget, train.epochs is a ceiling: fewer when few trials would fit
    n_workers: int | str = 1  # or auto: one per visible GPU, else one per threads_per_worker (2) cores
    threads_per_worker: int | None = None
    objective: str = "val_log_loss"
    cv_folds: int | None = None
    refit: str = "auto"
    sampler: str = "tpe"
    pruner: str = "auto"
    startup_trials: int = 3
    prune_warmup_epochs: int = 1
    seed: int = 0
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 2
    register_as: str | None = None
    enqueue: Path | None = None
    space: dict[str, Any] = dataclasses.field(default_factory=default_search_space)

    def validate(self) -> None:
        if isinstance(self.n_workers, str) and self.n_workers != "auto":
            raise UserError(f"search: option 'n_workers' must be a number or auto, got {self.n_workers!r}")
        for name in ("n_trials", "n_workers", "heartbeat_interval", "startup_trials", "max_retry"):
            if getattr(self, name) == "auto":
                continue
            minimum = 0 if name in ("startup_trials", "max_retry") else 1
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                raise UserError(f"search: option '{name}' must be >= {minimum}, got {getattr(self, name)}")
        for name in ("timeout", "threads_per_worker", "cv_folds", "grace_period"):
            value = getattr(self, name)
            if value is not None and value <= (1 if name == "cv_folds" else 0):
                raise UserError(f"search: option '{name}' must be {'>= 2' if name == 'cv_folds' else '> 0'}")
        if self.sampler not in SEARCH_SAMPLERS:
            raise UserError(f"search: unknown sampler '{self.sampler}'; use one of {', '.join(SEARCH_SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"search: unknown pruner '{self.pruner}'; use one of {', '.join(PRUNERS)}")
        if self.refit not in REFITS:
            raise UserError(f"search: unknown refit '{self.refit}'; use one of {', '.join(REFITS)}")
        if self.refit == "folds" and not self.cv_folds:
            raise UserError("search: refit 'folds' ensembles the best trial's fold models; set --cv-folds K too")
        if self.refit == "full" and not self.cv_folds:
            raise UserError(
                "search: refit 'full' takes its epochs and threshold from the best trial's folds; set --cv-folds K too"
            )
        if self.budget is not None and self.budget_seconds <= 0:
            raise UserError(f"search: option 'budget' must be above 0, got {self.budget}")
        if not isinstance(self.space, dict) or not self.space:
            raise UserError("search: 'space' must be a non-empty mapping of parameter: {type, ...}")

    @property
    def budget_seconds(self) -> float | None:
        """The wall time of the whole search (trials, refit, registration), from `budget`."""
        return None if self.budget is None else parse_duration(self.budget, "search: option 'budget'")

    @property
    def trial_limit(self) -> int | None:
        """Trials in the study in total: `n_trials`; with a budget and no `n_trials`, as many as it allows."""
        if self.n_trials is not None:
            return self.n_trials
        return None if self.budget is not None else DEFAULT_TRIALS

    @property
    def refit_kind(self) -> str:
        """How the champion is built: `folds` (the best configuration's fold models as one ensemble; `auto` with
        --cv-folds), `full` (that configuration retrained on every training image) or `none` (the best trial's
        model)."""
        if self.refit == "auto":
            return "folds" if self.cv_folds else "none"
        return self.refit

    @property
    def pruner_name(self) -> str:
        """`auto`: Hyperband (ASHA-like successive halving over epochs) under a budget, else the median rule."""
        if self.pruner != "auto":
            return self.pruner
        return "hyperband" if self.budget is not None else "median"


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "none")
LOSSES = ("cross_entropy", "focal")
CALIBRATIONS = ("none", "temperature")
TRAIN_SAMPLERS = ("random", "weighted")
AUGMENTATIONS = ("none", "light", "strong", "xray")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
CACHE_MODES = ("auto", "memory", "memmap")
DATA_ON_DEVICE = ("auto", "true", "false")


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
    threshold_rule: str = DEFAULT_THRESHOLD_RULE
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    ema_decay: float | None = None
    drop_rate: float | None = None
    drop_path_rate: float = 0.0
    positive_class: str | None = None
    calibrate: str = "none"
    tta: bool = False  # the model averages its recipe's flips; its threshold is tuned on those probabilities
    augment: str = "light"
    progressive_sizes: list[int] | None = None
    metadata: list[str] | None = None
    amp: str = "auto"
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False
    device: str = "auto"
    seed: int = 42
    monitor: str = "auto"
    patience: int = 0
    cache: str = "auto"
    num_workers: int | None = None
    data_on_device: str = "auto"  # hold the splits on the training device (auto: a GPU with room, or in-memory CPU)
    output_dir: Path = Path("outputs")
    checkpoint_upload_minutes: float = 5.0  # best.pt + last.pt to the artifact store while training; 0: never
    resume: str | None = None
    system_metrics: bool = True
    keep_outputs: bool = False  # keep OUTPUT_DIR/RUN_ID once the run is logged (`classifier train` and `cv` remove it)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise UserError(f"train: option '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "backbone_lr_scale", "gamma"):
            if getattr(self, name) <= 0:
                raise UserError(f"train: option '{name}' must be > 0, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "momentum",
            "warmup_epochs",
            "freeze_epochs",
            "patience",
            "focal_gamma",
            "checkpoint_upload_minutes",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"train: option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"train: option 'num_workers' must be >= 0, got {self.num_workers}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"train: option 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        ThresholdRule.parse(self.threshold_rule, "train: option 'threshold_rule'")
        self._validate_regularisation()
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
            "data_on_device": DATA_ON_DEVICE,
            "calibrate": CALIBRATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"train: unknown {name} '{getattr(self, name)}'; use one of {', '.join(allowed)}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"train: weights file {self.weights} does not exist; pass the path of a saved state_dict")

    def _validate_regularisation(self) -> None:
        """Mixup/cutmix, weight EMA, dropout and stochastic depth: each option's range, in one line."""
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise UserError(f"train: option '{name}' must be >= 0 (0 is off), got {getattr(self, name)}")
        if not 0 <= self.mixup_prob <= 1:
            raise UserError(f"train: option 'mixup_prob' must be in [0, 1], got {self.mixup_prob}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"train: option 'ema_decay' must be in (0, 1), e.g. 0.999, got {self.ema_decay}")
        for name in ("drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"train: option '{name}' must be in [0, 1), got {value}")
        if self.mixes and self.metadata:
            raise UserError("train: options 'mixup_alpha'/'cutmix_alpha' mix images only; leave them 0 with 'metadata'")

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (mixup or cutmix)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0


@dataclasses.dataclass
class EvaluateConfig:
    """How `classifier evaluate` scores a trained model on a prepared split."""

    experiment: str = "classifier"
    split: str = "test"
    tta: bool | None = None  # None: as the model was trained (its checkpoint's `tta`)
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
    threshold_rule: str | None = None
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
        if self.threshold_rule is not None:
            ThresholdRule.parse(self.threshold_rule, "ensemble: option 'threshold_rule'")
        if self.batch_size < 1:
            raise UserError(f"ensemble: option 'batch_size' must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise UserError(f"ensemble: unknown device '{self.device}'; use one of {', '.join(DEVICES)}")
