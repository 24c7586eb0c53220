"""The `classifier` command line: each command parses options, loads its config and calls one function."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import click

from classifier import __version__, stopping


class BlankIsUnset(click.ParamType):
    """Wraps a parameter type so that "" (how MLproject passes an option left at its default) means unset."""

    def __init__(self, inner: click.ParamType | type) -> None:
        self.inner = click.types.convert_type(inner)
        self.name = self.inner.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return self.inner.convert(value, param, ctx)


def blank_is_unset(inner: click.ParamType | type) -> BlankIsUnset:
    return BlankIsUnset(inner)


def _choice(*names: str) -> BlankIsUnset:
    return blank_is_unset(ExactChoice(names))


def _flag(name: str, help: str) -> Any:
    """A boolean option usable as `--name` alone or `--name true|false` (how MLproject passes it)."""
    return click.option(name, type=blank_is_unset(click.BOOL), is_flag=False, flag_value="true", help=help)


config_option = click.option(
    "--config",
    "config_path",
    type=blank_is_unset(click.Path(exists=True, dir_okay=False, path_type=Path)),
    help="Experiment YAML (experiments/NAME.yaml); options given on the command line override it.",
)


def underscores_as_dashes(token: str) -> str:
    """Click's token normaliser: `--batch_size` (how `mlflow run` passes `-P batch_size=8`) is `--batch-size`.

    Click applies it to option and command names and to Choice values (see ExactChoice), never to other values."""
    return token.replace("_", "-")


class ExactChoice(click.Choice):
    """A Choice matched and listed as spelled (`cross_entropy`), not through `underscores_as_dashes`."""

    def normalize_choice(self, choice: object, ctx: click.Context | None) -> str:
        return super().normalize_choice(choice, None)


@click.group(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "show_default": True,
        "token_normalize_func": underscores_as_dashes,
    }
)
@click.version_option(__version__, prog_name="classifier")
@click.option(
    "--verbose", is_flag=True, help="Show every warning and log line, also those known to be harmless (hidden)."
)
def main(verbose: bool) -> None:
    """Prepare image datasets, train, tune and serve classifiers, with every run tracked in MLflow."""
    if verbose:
        from classifier.console import set_verbose

        set_verbose()


@main.command("search")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@click.option("--study-name", type=blank_is_unset(str), help="Optuna study to create, resume or join. [search-DATA]")
@click.option(
    "--storage",
    type=blank_is_unset(str),
    help="Optuna storage: postgresql://... (or another RDB URL) to share a study; default a journal file beside the "
    "MLflow store.",
)
@click.option(
    "--n-trials",
    type=blank_is_unset(click.INT),
    help="Trials in the study in total (all workers). [20; with --budget: as many as fit]",
)
@click.option("--timeout", type=blank_is_unset(click.FLOAT), help="Stop starting trials after this many seconds.")
@click.option(
    "--budget",
    type=blank_is_unset(str),
    help="Wall time of the whole search, e.g. 1h, 90m: trials get 90%, then the champion is built; trials still "
    "running when their share ends are pruned. Epochs per trial are train.epochs, fewer when an epoch (timed on a "
    "few batches) leaves room for fewer than 8 whole trials.",
)
@click.option(
    "--refit",
    type=_choice("auto", "none", "folds", "full"),
    help="The champion: folds = the best configuration's K fold models as one ensemble; full = that configuration "
    "retrained on every training image for its folds' mean best epoch count; both with the threshold tuned on the "
    "out-of-fold predictions. none = the best trial's model. [auto: folds with --cv-folds]",
)
@click.option(
    "--n-workers",
    type=blank_is_unset(str),
    help="Worker processes here, one GPU each if any; auto: one per visible GPU, else one per 2 cores (or per "
    "--threads-per-worker). [1]",
)
@click.option("--threads-per-worker", type=blank_is_unset(click.INT), help="CPU threads per worker without GPUs.")
@click.option(
    "--objective",
    type=blank_is_unset(str),
    help="What trials are ranked on: a validation metric of fit (val_log_loss, val_roc_auc, ...), or auto (fit's "
    "--monitor default). With --cv-folds, its mean over the folds. [val_log_loss]",
)
@click.option("--cv-folds", type=blank_is_unset(click.INT), help="Score each trial by the mean over K folds.")
@click.option(
    "--sampler",
    type=blank_is_unset(click.Choice(["tpe", "gp", "random"])),
    help="Optuna sampler: TPE, Gaussian process (few hundred trials at most), random. [tpe]",
)
@click.option(
    "--pruner",
    type=blank_is_unset(click.Choice(["auto", "none", "median", "hyperband"])),
    help="Optuna pruner. [auto: hyperband with --budget, else median]",
)
@click.option("--seed", type=blank_is_unset(click.INT), help="Sampler seed (worker i uses seed + i). [0]")
@click.option("--register-as", type=blank_is_unset(str), help="Registered model name for the champion. [study name]")
@click.option(
    "--enqueue",
    type=blank_is_unset(click.Path(exists=True, dir_okay=False, path_type=Path)),
    help="YAML list of known-good {parameter: value} configurations to try first.",
)
@_flag(
    "--keep-outputs",
    "Keep each finished or pruned trial's local OUTPUT_DIR/RUN_ID folder (its best.pt and model are in MLflow). "
    "[false]",
)
@click.option(
    "--epochs",
    type=blank_is_unset(click.INT),
    help="Epochs per trial (overrides the train section and the space, and a --budget never lowers them).",
)
@click.option(
    "--model",
    type=blank_is_unset(str),
    help="Architecture for every trial (overrides the train section and the space).",
)
def search_command(
    data: Path,
    config_path: Path | None,
    epochs: int | None,
    model: str | None,
    keep_outputs: bool | None,
    **options: Any,
) -> None:
    """Tune training on prepared dataset DATA with an Optuna study; register the best model as `champion`."""
    from classifier.config import SearchConfig, TrainConfig, build_config, load_section
    from classifier.tune.search import search

    origin = str(config_path or "command line")
    fixed = {name: value for name, value in {"epochs": epochs, "model": model}.items() if value is not None}
    overrides = {**fixed, "keep_outputs": keep_outputs}
    train = build_config(TrainConfig, load_section(config_path, "train"), overrides, origin=origin)
    if epochs is not None:  # the epochs asked for, whatever the budget
        options["fit_epochs_to_budget"] = False
    config = build_config(SearchConfig, load_section(config_path, "search"), options, origin=origin)
    for name in fixed:
        config.space.pop(name, None)  # fixed on the command line: no longer searched
    with stopping.on_signals(note="stopping the study: running trials end after their current batch"):
        result = search(config, train, data)
    best = "no completed trial" if result.best_value is None else f"best {result.metric} {result.best_value:.4f}"
    champion = f"; registered version {result.registered_version} as champion" if result.registered_version else ""
    click.echo(f"study {result.study_name}: {best} {result.best_params}{champion}")


@main.command("prepare")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@config_option
@click.option("--size", type=blank_is_unset(click.IntRange(1)), help="Side of the square output images, px. [256]")
@click.option(
    "--resize",
    type=blank_is_unset(click.Choice(["stretch", "pad", "crop"])),
    help="Aspect ratio: stretch it, pad to a square, or crop the centre. [stretch]",
)
@click.option(
    "--channels",
    type=blank_is_unset(click.Choice(["1", "3", "4"])),
    help="Store as grey (1), RGB (3) or RGBA/RGBY (4). [as the images are: grey stays grey]",
)
@click.option("--bit-depth", type=blank_is_unset(click.Choice(["8", "16"])), help="Grey depth. [16 if any source is]")
@click.option("--fractions", type=blank_is_unset(click.STRING), help="training,validation,test shares. [0.8,0.1,0.1]")
@click.option("--folds", type=blank_is_unset(click.INT), help="Assign K cross-validation folds instead of validation/.")
@click.option("--seed", type=blank_is_unset(click.INT), help="Seed of the shuffled, stratified splits. [42]")
@click.option("--path-column", type=blank_is_unset(click.STRING), help="CSV source: column of image paths. [path]")
@click.option("--label-column", type=blank_is_unset(click.STRING), help="CSV source: column of labels. [label]")
@click.option("--group-column", type=blank_is_unset(click.STRING), help="CSV source: keep each group in one split.")
@click.option(
    "--class-names",
    type=blank_is_unset(click.STRING),
    help=".npz: names of labels 0,1,...; CSV: the only classes allowed (a label may be an index into them).",
)
@click.option(
    "--positive-class",
    type=blank_is_unset(click.STRING),
    help="Two classes: the one thresholds, sensitivity and AUC are about. [the one not named normal, healthy, "
    "benign, negative or no_finding; else the second]",
)
@_flag(
    "--multi-label", "CSV source: each label cell lists classes separated by spaces (sigmoid, multi-label training)."
)
@click.option(
    "--channel-files",
    type=blank_is_unset(click.STRING),
    help="CSV source: stack the files <path>_<name>.<ext> of these 3 or 4 channels, e.g. red,green,blue,yellow.",
)
@click.option(
    "--window",
    type=blank_is_unset(click.STRING),
    help="DICOM: window CENTRE,WIDTH (e.g. 40,400) instead of each file's VOI LUT / window.",
)
@click.option(
    "--frame", type=blank_is_unset(click.INT), help="DICOM: frame of multi-frame files (volumes need it). [0]"
)
@click.option(
    "--group-tag",
    type=blank_is_unset(click.STRING),
    help="DICOM: keep each value of this tag (e.g. PatientID) in one split; stored as a salted hash.",
)
@_flag("--keep-tags", "DICOM: store the --group-tag value itself, not its salted hash (patient identifiers!).")
@click.option("--workers", type=blank_is_unset(click.IntRange(1)), help="Worker processes. [all cores]")
@_flag("--skip-invalid", "Skip unreadable images (recorded in dataset.json) instead of failing.")
@_flag("--overwrite", "Replace an OUTPUT prepared from other inputs or settings.")
@click.option("--experiment", type=blank_is_unset(click.STRING), help="MLflow experiment (when tracking). [classifier]")
def prepare_command(source: Path, output: Path, config_path: Path | None, **options: Any) -> None:
    """Turn SOURCE (class folders, training/validation/test folders, a CSV or a MedMNIST .npz) into OUTPUT."""
    from classifier.config import PrepareConfig, build_config, load_section
    from classifier.data.layout import images_per_split, read_manifest
    from classifier.data.prepare import prepare

    config = build_config(PrepareConfig, load_section(config_path, "prepare"), options, origin="prepare")
    info = prepare(source, output, config)
    if any(os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")):  # by the user or `mlflow run`
        from classifier import tracking  # imports mlflow (seconds): only when there is a run to log to

        tracking.log_prepared_dataset(config.experiment, source, output, dataclasses.asdict(config), info)
    counts = ", ".join(f"{split} {images}" for split, images in images_per_split(read_manifest(output)).items())
    click.echo(f"{output}: {len(info.classes)} classes, {counts}, {len(info.skipped)} skipped")


@main.command("example-data")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
def example_data(output: Path) -> None:
    """Write scikit-learn's digits (1797 grey 8x8 images, 10 classes) to OUTPUT/<digit>/*.png."""
    from classifier.data.examples import write_digits

    click.echo(f"{output}: {write_digits(output)} images in 10 class folders")


model_setting_options = [
    click.option("--batch-size", type=blank_is_unset(click.IntRange(1)), help="Images per forward pass. [64]"),
    click.option(
        "--tta",
        type=blank_is_unset(click.BOOL),
        is_flag=False,
        flag_value="true",
        help="Average the probabilities over flips (test-time augmentation). [the model's setting: as trained]",
    ),
    click.option("--device", type=blank_is_unset(click.STRING), help="cpu, cuda or cuda:N. [cuda when available]"),
    click.option("--workers", type=blank_is_unset(click.IntRange(1)), help="Threads decoding images. [one per core]"),
    click.option(
        "--window",
        type=blank_is_unset(click.STRING),
        help="DICOM inputs: window CENTRE,WIDTH. [as prepare read the training data, else each file's own]",
    ),
    click.option("--frame", type=blank_is_unset(click.INT), help="DICOM inputs: frame of multi-frame files. [0]"),
]


def dicom_settings(command: str, window: str | None, frame: int | None) -> dict[str, Any]:
    """--window C,W and --frame K as the model settings `dicom_window` and `dicom_frame` (None: the model's own)."""
    from classifier.config import check_dicom_settings
    from classifier.errors import UserError

    values = None
    if window is not None:
        try:
            values = [float(part) for part in window.split(",")]
        except ValueError:
            raise UserError(f"{command}: --window must be CENTRE,WIDTH in numbers, e.g. 40,400; got {window}") from None
    check_dicom_settings(command, values, frame)
    return {"dicom_window": values, "dicom_frame": frame}


def model_settings(command: Any) -> Any:
    for option in reversed(model_setting_options):
        command = option(command)
    return command


@main.command("predict")
@click.argument("model")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=blank_is_unset(click.Path(dir_okay=False, allow_dash=True, path_type=Path)),
    help="CSV to write, - for stdout. [predictions.csv]",
)
@click.option(
    "--channel-files",
    type=blank_is_unset(str),
    help="PATHS are CSVs of image stems; stack each stem's files <stem>_<name>.<ext>, e.g. red,green,blue,yellow.",
)
@model_settings
def predict_command(
    model: str, paths: tuple[Path, ...], output: Path | None, channel_files: str | None, **settings: Any
) -> None:
    """Label images with MODEL (a checkpoint file or an MLflow model URI such as models:/NAME@champion).

    PATHS are image files, folders (searched recursively) or CSVs with a `path` column. Writes one row per image:
    path, label, confidence, prob_<class>..., error (why an image could not be read; the others still run).
    """
    from classifier.serving.predict import predict

    channels = [name for name in (channel_files or "").replace(",", " ").split() if name]
    dicom = dicom_settings("predict", settings.pop("window"), settings.pop("frame"))
    predict(model, paths, output or Path("predictions.csv"), channel_files=channels or None, **settings, **dicom)


@main.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, help="Port to listen on.")
@click.option(
    "--max-upload-mb", type=click.FloatRange(0, min_open=True), default=20.0, help="Largest accepted upload, MB."
)
@model_settings
def serve_command(model: str, **options: Any) -> None:
    """Serve MODEL (checkpoint file or MLflow model URI) over HTTP: POST /predict, /explain, GET /health, docs /docs."""
    from classifier.serving.http import serve

    dicom = dicom_settings("serve", options.pop("window"), options.pop("frame"))
    serve(model, **options, **dicom)


@main.command("explain")
@click.argument("model")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=blank_is_unset(click.Path(file_okay=False, path_type=Path)),
    help="Folder for <stem>.png overlays, <stem>.npy maps and explanations.csv. [explanations]",
)
@click.option("--target-class", type=blank_is_unset(str), help="Class to explain. [each image's predicted class]")
@click.option("--device", type=blank_is_unset(click.STRING), help="cpu, cuda or cuda:N. [cuda when available]")
@click.option("--window", type=blank_is_unset(click.STRING), help="DICOM inputs: window CENTRE,WIDTH. [the model's]")
@click.option("--frame", type=blank_is_unset(click.INT), help="DICOM inputs: frame of multi-frame files. [0]")
def explain_command(
    model: str,
    paths: tuple[Path, ...],
    output: Path | None,
    window: str | None,
    frame: int | None,
    **options: Any,
) -> None:
    """Grad-CAM of MODEL on image files or folders PATHS: where it looked for the predicted (or target) class."""
    from classifier.evaluation.explain import explain

    explain(model, paths, output or Path("explanations"), **options, **dicom_settings("explain", window, frame))


@main.command("export")
@click.argument("model")
@click.option("--format", "format_", type=_choice("onnx"), default="onnx", help="Portable format.")
@click.option(
    "--output",
    "-o",
    type=blank_is_unset(click.Path(dir_okay=False, path_type=Path)),
    help="File to write. [model.onnx]",
)
def export_command(model: str, format_: str, output: Path | None) -> None:
    """Export MODEL (checkpoint, run id or model URI) to ONNX, checked against PyTorch, logged to its run."""
    from classifier.evaluation.export import TOLERANCE, export

    result = export(model, output or Path("model.onnx"), format_)
    click.echo(
        f"{result.path}: onnxruntime matches PyTorch within {result.max_abs_difference:.2e} "
        f"(tolerance {TOLERANCE:g})" + (f"; logged to run {result.run_id} under export/" if result.run_id else "")
    )


train_options = [
    click.option("--experiment", type=blank_is_unset(str), help="MLflow experiment. [classifier]"),
    click.option("--model", type=blank_is_unset(str), help="simple_cnn or any timm model name. [simple_cnn]"),
    _flag("--pretrained", "Start from pretrained weights (offline: the packaged efficientnet_lite0 weights)."),
    click.option(
        "--weights",
        type=blank_is_unset(click.Path(dir_okay=False, path_type=Path)),
        help="Local state_dict (or checkpoint) to start from; first conv and head are adapted as timm does.",
    ),
    click.option("--epochs", type=blank_is_unset(click.INT), help="Epochs in total. [10]"),
    click.option("--batch-size", type=blank_is_unset(click.INT), help="Training images per step. [64]"),
    click.option("--optimizer", type=_choice("adamw", "sgd"), help="AdamW or SGD with momentum. [adamw]"),
    click.option("--lr", type=blank_is_unset(click.FLOAT), help="Peak learning rate. [0.001]"),
    click.option("--weight-decay", type=blank_is_unset(click.FLOAT), help="Weight decay. [0.0001]"),
    click.option("--momentum", type=blank_is_unset(click.FLOAT), help="SGD momentum. [0.9]"),
    click.option("--scheduler", type=_choice("cosine", "step", "plateau", "none"), help="LR schedule. [cosine]"),
    click.option("--warmup-epochs", type=blank_is_unset(click.INT), help="Linear warm-up epochs. [0]"),
    click.option("--step-size", type=blank_is_unset(click.INT), help="Step schedule: epochs between decays. [10]"),
    click.option("--gamma", type=blank_is_unset(click.FLOAT), help="Step/plateau schedule: decay factor. [0.1]"),
    click.option("--plateau-patience", type=blank_is_unset(click.INT), help="Plateau: epochs before decay. [2]"),
    click.option(
        "--freeze-epochs", type=blank_is_unset(click.INT), help="Train only the head for N epochs, then all. [0]"
    ),
    click.option(
        "--backbone-lr-scale", type=blank_is_unset(click.FLOAT), help="Backbone lr factor after unfreezing. [0.1]"
    ),
    click.option("--loss", type=_choice("cross_entropy", "focal"), help="Training loss. [cross_entropy]"),
    click.option("--focal-gamma", type=blank_is_unset(click.FLOAT), help="Focal loss focusing parameter. [2.0]"),
    _flag("--class-weights", "Weight the loss by inverse class frequency."),
    click.option("--sampler", type=_choice("random", "weighted"), help="weighted: class-balanced batches. [random]"),
    click.option("--label-smoothing", type=blank_is_unset(click.FLOAT), help="Label smoothing in [0, 1). [0]"),
    click.option("--mixup-alpha", type=blank_is_unset(click.FLOAT), help="Mixup Beta(alpha, alpha); 0 is off. [0]"),
    click.option("--cutmix-alpha", type=blank_is_unset(click.FLOAT), help="CutMix Beta(alpha, alpha); 0 is off. [0]"),
    click.option(
        "--mixup-prob", type=blank_is_unset(click.FLOAT), help="Share of batches mixed (mixup or cutmix). [1]"
    ),
    click.option(
        "--ema-decay",
        type=blank_is_unset(click.FLOAT),
        help="Validate and keep an EMA of the weights with this decay, e.g. 0.999. [off]",
    ),
    click.option("--drop-rate", type=blank_is_unset(click.FLOAT), help="Dropout before the head. [the model's]"),
    click.option(
        "--drop-path-rate", type=blank_is_unset(click.FLOAT), help="Stochastic depth (timm models with blocks). [0]"
    ),
    click.option(
        "--threshold-rule",
        type=blank_is_unset(str),
        help="How the decision threshold is chosen on validation: max_f1, youden (max sensitivity + specificity), "
        "balanced (sensitivity = specificity), recall:R or specificity:S, e.g. recall:0.95. [youden]",
    ),
    click.option(
        "--positive-class",
        type=blank_is_unset(str),
        help="Binary tasks: the class thresholds, sensitivity and AUC are about. [the dataset's positive class]",
    ),
    click.option(
        "--calibrate",
        type=_choice("none", "temperature"),
        help="temperature: fit temperature scaling on validation; the model serves calibrated probabilities. [none]",
    ),
    click.option("--augment", type=_choice("none", "light", "strong", "xray"), help="Augmentation recipe. [light]"),
    _flag(
        "--tta",
        "The model averages the recipe's flips (test-time augmentation) wherever it predicts; its threshold is tuned "
        "on those probabilities. [false]",
    ),
    click.option(
        "--progressive-sizes",
        type=blank_is_unset(str),
        help="Progressive resizing: training image sizes in equal shares of the epochs, e.g. 128,224. [off]",
    ),
    click.option(
        "--metadata",
        type=blank_is_unset(str),
        help="Manifest columns fed to the model beside the image, e.g. age,sex,localization. [none]",
    ),
    click.option("--amp", type=_choice("auto", "bf16", "fp16", "off"), help="Mixed precision (CUDA only). [auto]"),
    _flag("--channels-last", "Use the channels_last memory format (faster convolutions on GPUs). [on CUDA]"),
    _flag(
        "--compile",
        "torch.compile the network: faster steps on GPUs after a compile of a minute or so (a search can tune it). "
        "[false]",
    ),
    click.option("--device", type=_choice("auto", "cpu", "cuda"), help="Where to train. [auto: cuda if available]"),
    click.option("--seed", type=blank_is_unset(click.INT), help="Seed of weights, batches and augmentation. [42]"),
    click.option("--monitor", type=blank_is_unset(str), help="Metric for best epoch / early stopping. [auto]"),
    click.option("--patience", type=blank_is_unset(click.INT), help="Stop after N epochs without gain; 0 never. [0]"),
    click.option("--cache", type=_choice("auto", "memory", "memmap"), help="Decoded image cache. [auto]"),
    click.option(
        "--num-workers",
        type=blank_is_unset(click.INT),
        help="Loader processes, when batches do not come from the device. [auto]",
    ),
    click.option(
        "--data-on-device",
        type=_choice("auto", "true", "false"),
        help="Copy the decoded splits to the training device once and draw batches there (no loader processes). "
        "[auto: on a GPU when they fit half its free memory; on the CPU when in memory]",
    ),
    click.option(
        "--output-dir",
        type=blank_is_unset(click.Path(file_okay=False, path_type=Path)),
        help="Where checkpoints are written (OUTPUT_DIR/RUN_ID/{best,last}.pt). [outputs]",
    ),
    click.option(
        "--checkpoint-upload-minutes",
        type=blank_is_unset(click.FloatRange(0)),
        help="Copy best.pt and last.pt to the run's artifacts this often while training, so that --resume RUN_ID "
        "works on another machine; 0 never. [5]",
    ),
    _flag("--system-metrics", "Log CPU/GPU/memory use to the run. [true]"),
    _flag(
        "--keep-outputs",
        "Keep the local OUTPUT_DIR/RUN_ID folder of a finished run (its model and report are in MLflow). [false]",
    ),
]


def with_options(options: list[Any]) -> Any:
    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _train_config(config_path: Path | None, options: dict[str, Any]) -> Any:
    from classifier.config import TrainConfig, build_config, load_section

    return build_config(TrainConfig, load_section(config_path, "train"), options, origin=str(config_path or "train"))


@main.command("train")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@with_options(train_options)
@click.option("--resume", type=blank_is_unset(str), help="Continue this killed run from its last checkpoint.")
@click.option("--run-name", type=blank_is_unset(str), help="MLflow run name.")
def train_command(data: Path, config_path: Path | None, run_name: str | None, **options: Any) -> None:
    """Train a classifier on prepared dataset DATA in one MLflow run (running it again resumes a killed run)."""
    from classifier.learn.train import discard_outputs, fit

    config = _train_config(config_path, options)
    with stopping.on_signals():  # Ctrl-C or `kill PID`: the run ends KILLED between two batches, resumable
        result = fit(config, data, run_name=run_name)
    scores = ", ".join(f"{key} {value:.4f}" for key, value in result.best_metrics.items() if key.startswith("val_"))
    click.echo(f"run {result.run_id}: best epoch {result.best_epoch} of {result.epochs_run}: {scores}")
    discard_outputs(config, [result.run_id])
    kept = f"checkpoint {result.checkpoint}; " if config.keep_outputs else ""
    click.echo(f"{kept}model {result.model_uri}")


@main.command("cv")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@with_options(train_options)
@click.option("--run-name", type=blank_is_unset(str), help="MLflow name of the parent run.")
def cv_command(data: Path, config_path: Path | None, run_name: str | None, **options: Any) -> None:
    """Cross-validate on the folds of DATA: a parent run with one nested run per fold, mean and std of each metric."""
    from classifier.learn.cv import cross_validate
    from classifier.learn.train import discard_outputs

    config = _train_config(config_path, options)
    with stopping.on_signals():
        result = cross_validate(config, data, run_name=run_name)
    discard_outputs(config, result.fold_run_ids)
    click.echo(f"each fold's best epoch, mean ± std over {len(result.fold_run_ids)} folds:")
    for key in sorted(result.mean):
        click.echo(f"best_{key}: {result.mean[key]:.4f} ± {result.std[key]:.4f}")
    click.echo(f"parent run {result.run_id}")


@main.command("evaluate")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@click.option("--split", type=_choice("training", "validation", "test"), help="Prepared split to score. [test]")
@_flag("--tta", "Average the probabilities over flips (test-time augmentation). [as the model was trained]")
@click.option("--bootstrap", type=blank_is_unset(click.INT), help="Bootstrap resamples for 95% CIs; 0 off. [1000]")
@click.option("--batch-size", type=blank_is_unset(click.INT), help="Images per forward pass. [256]")
@click.option("--device", type=_choice("auto", "cpu", "cuda"), help="Where to run. [auto]")
@click.option("--experiment", type=blank_is_unset(str), help="MLflow experiment of the evaluation run. [classifier]")
@click.option("--seed", type=blank_is_unset(click.INT), help="Bootstrap seed. [42]")
def evaluate_command(model: str, data: Path, config_path: Path | None, **options: Any) -> None:
    """Score MODEL (a checkpoint, a run id, or an MLflow model URI) on a split of DATA; log metrics and plots."""
    from classifier.config import EvaluateConfig, build_config, load_section
    from classifier.evaluation.evaluate import evaluate

    config = build_config(EvaluateConfig, load_section(config_path, "evaluate"), options, origin="evaluate")
    result = evaluate(config, model, data)
    for key, value in result.metrics.items():
        interval = result.intervals.get(key)
        click.echo(f"{key}: {value:.4f}" + (f" (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""))
    if result.absent:
        click.echo(
            f"no {config.split} images of {', '.join(result.absent)}: left out of the averages (not scored 0), "
            "their per-class scores nan"
        )
    click.echo(f"run {result.run_id}")


@main.command("embed")
@click.argument("model")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@click.option("--split", type=_choice("training", "validation", "test"), help="Prepared split to embed. [validation]")
@click.option("--batch-size", type=blank_is_unset(click.INT), help="Images per forward pass. [256]")
@click.option("--device", type=_choice("auto", "cpu", "cuda"), help="Where to run. [auto]")
@click.option("--experiment", type=blank_is_unset(str), help="MLflow experiment of the embed run. [classifier]")
@click.option("--perplexity", type=blank_is_unset(click.FLOAT), help="t-SNE perplexity (kept below the images). [30]")
@click.option(
    "--max-images", type=blank_is_unset(click.INT), help="t-SNE of at most this many, a stratified sample. [2000]"
)
@click.option("--seed", type=blank_is_unset(click.INT), help="Seed of the sample and of t-SNE. [42]")
def embed_command(model: str, data: Path, config_path: Path | None, **options: Any) -> None:
    """Log MODEL's penultimate-layer embeddings of a split of DATA and a t-SNE plot of them, coloured by class."""
    from classifier.config import EmbedConfig, build_config, load_section
    from classifier.evaluation.embed import ARTIFACTS, embed

    config = build_config(EmbedConfig, load_section(config_path, "embed"), options, origin="embed")
    result = embed(config, model, data)
    silhouette = "" if result.silhouette is None else f", silhouette {result.silhouette:.3f} by class"
    click.echo(
        f"{len(result.paths)} {config.split} images embedded ({result.embeddings.shape[1]} features), "
        f"{len(result.rows)} mapped by t-SNE{silhouette}"
    )
    click.echo(
        f"run {result.run_id}: {ARTIFACTS}/embeddings.npz, embeddings.csv, tsne.png "
        f"(fetch: mlflow artifacts download -r {result.run_id} -a {ARTIFACTS})"
    )


@main.command("ensemble")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@click.option("--study", type=blank_is_unset(str), help="Optuna study whose best completed trials are the members.")
@click.option(
    "--storage", type=blank_is_unset(str), help="Where the study lives (as for search). [the default journal file]"
)
@click.option("--top-k", type=blank_is_unset(click.INT), help="With --study: how many of the best trials. [3]")
@click.option(
    "--runs", type=blank_is_unset(str), help="Members instead of a study: training run ids (or checkpoints), a,b,..."
)
@click.option("--split", type=_choice("training", "validation", "test"), help="Split to score on. [test]")
@click.option(
    "--threshold-rule",
    type=blank_is_unset(str),
    help="max_f1, youden, balanced, recall:R or specificity:S. [the members' own, else youden]",
)
@click.option("--register-as", type=blank_is_unset(str), help="Register the ensemble as a version of this model.")
@click.option("--batch-size", type=blank_is_unset(click.INT), help="Images per forward pass. [256]")
@click.option("--device", type=_choice("auto", "cpu", "cuda"), help="Where to run. [auto]")
@click.option("--experiment", type=blank_is_unset(str), help="MLflow experiment of the ensemble run. [classifier]")
def ensemble_command(data: Path, config_path: Path | None, **options: Any) -> None:
    """Average the probabilities of a study's top trials (or given runs) into one model; score them all on DATA."""
    from classifier.config import EnsembleConfig, build_config, load_section
    from classifier.tune.ensemble import build_ensemble

    config = build_config(EnsembleConfig, load_section(config_path, "ensemble"), options, origin="ensemble")
    result = build_ensemble(config, data)
    click.echo(result.table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    if isinstance(result.threshold, list):
        threshold = ", ".join(f"{value:.4f}" for value in result.threshold) + " (per class)"
    else:
        threshold = "argmax" if result.threshold is None else f"{result.threshold:.4f}"
    click.echo(f"run {result.run_id}: decision threshold {threshold}; model {result.model_uri}")
    if result.registered_version:
        click.echo(f"registered as models:/{config.register_as}/{result.registered_version}")
