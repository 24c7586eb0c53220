"""Processes as others see them: this one's identity (host, pid, start time), whether a recorded one is gone, and
exclusive file locks that end with their holder (so a killed process never leaves a lock behind)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

import psutil

START_TOLERANCE_S = 0.5  # the same process reads the same start time; a reused pid starts later than this


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or `taskset`'s share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def identity(pid: int | None = None) -> dict[str, Any]:
    """Who runs: this host, the pid (this process by default) and its start time (a reused pid has another one)."""
    process = psutil.Process(pid)
    return {"host": socket.gethostname(), "pid": process.pid, "started": round(process.create_time(), 3)}


def is_gone(recorded: dict[str, Any]) -> bool | None:
    """True when the process `identity()` recorded has ended (or its pid now names another process), False while it
    runs, None when it ran on another host (nothing can be told from here)."""
    if recorded.get("host") != socket.gethostname():
        return None
    try:
        process = psutil.Process(int(recorded["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
            return True
        return abs(process.create_time() - float(recorded["started"])) > START_TOLERANCE_S
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return True


def describe(recorded: dict[str, Any] | None) -> str:
    """How messages name a recorded process: "pid 123 on host"."""
    if not recorded:
        return "another process"
    return f"pid {recorded.get('pid')} on {recorded.get('host')}"


class Held(Exception):
    """The lock file is held by another live process, `holder` (its identity, when it could be read)."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        super().__init__(f"{path} is held by {describe(holder)}")
        self.path, self.holder = path, holder


def lock(path: Path, wait: bool = False) -> int:
    """An open descriptor of `path` holding its exclusive flock, this process's identity written in it; `Held` when
    another process holds it (with `wait`, once it is released), OSError when it cannot be created. The lock ends with
    the process, however it ends."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise Held(path, holder) from None
        try:
            if os.path.samestat(os.stat(path), os.fstat(descriptor)):
                os.ftruncate(descriptor, 0)
                os.write(descriptor, json.dumps(identity()).encode())
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # locked a file its holder had just removed (see unlock): lock the new one


def unlock(descriptor: int, path: Path) -> None:
    """Release a lock taken by `lock`, removing its file (a process that opened it meanwhile sees it gone)."""
    Path(path).unlink(missing_ok=True)
    os.close(descriptor)


def _holder(descriptor: int) -> dict[str, Any] | None:
    try:
        return json.loads(os.pread(descriptor, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
