"""What reaches the console: our progress bars and results, not warnings a user cannot act on.

Warnings known to be harmless are silenced where they arise (a warnings filter or a logger level around the call
that causes them), unless `classifier --verbose` asked for everything. The setting lives in the environment, so
the worker processes of prepare and search follow it too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

VERBOSE = "CLASSIFIER_VERBOSE"
BARS = "CLASSIFIER_PROGRESS_BARS"  # "0": no bars at all (search workers, whose launcher shows the study's one line)


def verbose() -> bool:
    """Whether the user asked for every warning and log line (`classifier --verbose`, or CLASSIFIER_VERBOSE=1)."""
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    os.environ[VERBOSE] = "1"


def progress(iterable: Any = None, **options: Any) -> tqdm:
    """A tqdm bar on stderr. Written to a log (stderr not a terminal), a bar opened while another one runs stays
    hidden: the outer bar keeps counting, where nested bars would come out as interleaved fragments."""
    nested = any(not bar.disable for bar in list(tqdm._instances))  # tqdm's set of the bars open now
    hidden = (nested and not sys.stderr.isatty()) or os.environ.get(BARS) == "0"
    return tqdm(iterable, file=sys.stderr, disable=options.pop("disable", False) or hidden, **options)


@contextmanager
def hushed(*loggers: str, environment: dict[str, str] | None = None) -> Iterator[None]:
    """Unless verbose, `loggers` say only warnings and `environment` is set (e.g. a library's switch for its own
    progress bars) for the duration of the block; both are as before afterwards."""
    if verbose():
        yield
        return
    levels = {name: logging.getLogger(name).level for name in loggers}
    saved = {name: os.environ.get(name) for name in environment or {}}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.update(environment or {})
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
