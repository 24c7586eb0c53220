"""The one error type users see: a single line naming the file or parameter and what to do."""

import click


class UserError(click.ClickException):
    """Bad input or environment; the CLI prints `Error: <message>` and exits with status 1."""
