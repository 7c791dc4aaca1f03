"""Optuna storage: open an RDB URL (SQLite in the run folder, or PostgreSQL), find a study.

A database server may restart under a running search (``docker-compose restart postgres``, a
failover): ``pool_pre_ping`` replaces the pooled connections the restart broke, and a storage call
that fails because the server cannot be reached is retried for up to ``RETRY_SECONDS``, so the
driver waits out the restart instead of dying. Only lost connections are retried; other errors
(constraints, a finished trial) raise at once. SQLite has no server and is never retried.
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

from ..errors import LBSearchError

RETRY_SECONDS = 120.0  # how long a storage call waits for a database server that went away
_CACHE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids")


def sqlite_url(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'optuna.db'}"


def shown(url: str) -> str:
    """``url`` with any password hidden (for messages and reports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy reads: show only its scheme
        return url.split("://", 1)[0] + "://..."


def open_storage(url: str):
    """An ``RDBStorage`` that outlives a restart of its database server (see the module docstring);
    an unreachable or bad URL is a one-line error at once."""
    import optuna

    try:
        cls = optuna.storages.RDBStorage if url.startswith("sqlite") else _reconnecting_storage()
        storage = cls(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors of every kind: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LBSearchError(f"--storage {shown(url)}: cannot open ({first})") from None
    if storage.engine.dialect.name == "sqlite":
        _write_ahead_log(storage.engine)
    return storage


def _connection_lost(exc: BaseException) -> bool:
    """The call failed because the database server could not be reached (or dropped the connection)."""
    from sqlalchemy import exc as sa

    for e in (exc, exc.__cause__):
        if isinstance(e, sa.DisconnectionError) or (isinstance(e, sa.DBAPIError) and (
                e.connection_invalidated or isinstance(e, (sa.OperationalError, sa.InterfaceError)))):
            return True
    return False


@functools.cache
def _reconnecting_storage():
    """``RDBStorage`` whose storage calls retry a lost connection for up to ``RETRY_SECONDS``."""
    from optuna.storages import BaseStorage, RDBStorage

    local = threading.local()  # calls nested in a retried call (get_best_trial -> get_trial) do not retry

    def retrying(name: str):
        method = getattr(RDBStorage, name)

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if getattr(local, "depth", 0):
                return method(self, *args, **kwargs)
            deadline, delay, warned = time.monotonic() + RETRY_SECONDS, 0.5, False
            while True:
                local.depth = 1
                try:
                    return method(self, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - only a lost connection is retried
                    if not _connection_lost(exc) or time.monotonic() + delay > deadline:
                        raise
                    if not warned:
                        print(f"lbsearch: the study database is unreachable ({_first_line(exc)}); retrying for "
                              f"up to {RETRY_SECONDS:.0f} s", file=sys.stderr, flush=True)
                        warned = True
                finally:
                    local.depth = 0
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

        return call

    # every storage call: BaseStorage's public methods, and the private ones optuna's cache layer
    # (_CachedStorage, which wraps an RDBStorage in a study) calls directly
    names = [n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")
             and n != "remove_session"] + [n for n in _CACHE_CALLS if hasattr(RDBStorage, n)]
    return type("ReconnectingRDBStorage", (RDBStorage,), {n: retrying(n) for n in names})


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]


def _write_ahead_log(engine) -> None:
    """SQLite in WAL mode with normal sync: a trial writes ~20 small transactions, and a full fsync
    each (the default) costs more than an ``assembled`` trial; readers (the dashboard) never block
    the driver. Safe against a crashed process; a power cut may lose the last trials."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # pooled connections opened before the listener reconnect with it


def study_names(storage) -> list[str]:
    import optuna

    return optuna.study.get_all_study_names(storage)


def load_study(url: str, name: str | None = None, storage=None):
    """The study ``name`` in ``url`` (the only one there when ``name`` is None); one-line errors."""
    import optuna

    storage = storage or open_storage(url)
    names = study_names(storage)
    if name is None:
        if len(names) != 1:
            raise LBSearchError(f"{shown(url)}: {len(names)} studies ({', '.join(names) or 'none'}); "
                                "pick one with --study")
        name = names[0]
    if name not in names:
        raise LBSearchError(f"{shown(url)}: no study {name!r} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
