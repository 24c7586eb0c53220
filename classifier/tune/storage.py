"""Where an Optuna study lives: a journal file beside the local MLflow store, or a shared database (RDBStorage)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from classifier import tracking
from classifier.errors import UserError

JOURNAL_FILE = "optuna.journal"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
CONNECT_TIMEOUT_S = 5
CREATE_ATTEMPTS = 3


def default_storage() -> str:
    """The journal file beside the MLflow store: next to a sqlite tracking database, else in the working directory."""
    uri = tracking.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path.cwd()
    return str(folder / JOURNAL_FILE)


def open_storage(
    url: str | None,
    *,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """A journal file for `None` or a path, RDBStorage (with heartbeats) for a database URL; fails fast when down."""
    if url is None or "://" not in url:
        path = Path(url or default_storage()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in RDB_SCHEMES:
        raise UserError(
            f"--storage {url}: unknown scheme '{scheme}'; use postgresql://, mysql:// or sqlite:// URLs, "
            "or a file path for a local journal"
        )
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy 2.1 defaults to psycopg 3
    engine_kwargs: dict = {"pool_pre_ping": True}
    if scheme != "sqlite":
        engine_kwargs.update(pool_size=2, max_overflow=2, pool_recycle=300)
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or 2 * heartbeat_interval,
                heartbeat_stale_trial_callback=stale_trial_callback,
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on a fresh database race to create Optuna's tables (optuna #1092).
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(1 + attempt)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, ImportError) as error:
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            raise UserError(
                f"--storage {_redacted(url)}: cannot open the study database ({reason}); check it runs"
            ) from None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.password, "***") if parts.password else url
