"""The `classifier` command line: each command parses options, loads its config and calls one function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from classifier import __version__


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


config_option = click.option(
    "--config",
    "config_path",
    type=blank_is_unset(click.Path(exists=True, dir_okay=False, path_type=Path)),
    help="Experiment YAML (experiments/NAME.yaml); options given on the command line override it.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="classifier")
def main() -> None:
    """Prepare image datasets, train, tune and serve classifiers, with every run tracked in MLflow."""
