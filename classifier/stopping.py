"""Stop requests: a signal only sets a flag, which long loops check between batches; it never interrupts a write.

Inside `on_signals()`, the first SIGINT (Ctrl-C) or SIGTERM (`kill`, `docker stop`, a batch scheduler) requests a
stop: `check()` then raises `Interrupted` at the next safe point (between batches, between trials), so checkpoints,
MLflow flushes and logging always complete, and the run ends KILLED and resumable. A second signal forces: the
handlers that were in place come back and the signal raises KeyboardInterrupt wherever the program is.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

SIGNALS = (signal.SIGINT, signal.SIGTERM)
Item = TypeVar("Item")

_reason: str | None = None  # why a stop was requested; None while none is
_depth = 0  # nested on_signals() blocks; the outermost one clears the request when it ends


class Interrupted(KeyboardInterrupt):
    """Raised by `check()` at a safe point after a stop request (a KeyboardInterrupt, so runs end KILLED)."""


def request(reason: str) -> None:
    """Ask the running loops to stop at their next safe point (the first reason given is kept)."""
    global _reason
    if _reason is None:
        _reason = reason


def requested() -> str | None:
    """Why a stop was requested (e.g. "SIGTERM"), or None."""
    return _reason


def check() -> None:
    """Raise `Interrupted` when a stop was requested; call it where stopping loses nothing."""
    if _reason is not None:
        raise Interrupted(_reason)


def checked(items: Iterable[Item]) -> Iterator[Item]:
    """`items` with a `check()` before each one is fetched (a loader's batches: stop between two batches)."""
    for item in items:
        check()
        yield item
    check()


@contextmanager
def on_signals(note: str = "stopping after the current batch") -> Iterator[None]:
    """While inside, SIGINT and SIGTERM request a stop (first signal) or force one (second); the previous handlers
    come back at the end and the request is cleared. Outside the main thread it only runs the block (Python delivers
    signals to the main thread)."""
    global _depth, _reason
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def handle(number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if _reason is None:
            request(name)
            os.write(2, f"\n{name}: {note}; send it again to stop at once\n".encode())  # print() is not reentrant
            return
        restore()
        raise KeyboardInterrupt(f"{name} again: stopping at once")

    for number in SIGNALS:
        signal.signal(number, handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        restore()
        if _depth == 0:
            _reason = None
