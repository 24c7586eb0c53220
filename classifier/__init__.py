"""classifier: MLflow-tracked image classification with Optuna tuning, built for medical imaging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("classifier")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
