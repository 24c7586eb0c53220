"""The `classifier` command line: each command parses options, loads its config and calls one function."""

from __future__ import annotations

import click

from classifier import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="classifier")
def main() -> None:
    """Prepare image datasets, train, tune and serve classifiers, with every run tracked in MLflow."""
