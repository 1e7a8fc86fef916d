"""The run store: every run of every sweep in one SQLite database.

A run is written in one transaction when it ends, so a crash or a kill leaves either the whole
run or none of it. A run that started but never ended stays ``running`` and is trained again
by the next sweep; ``finished`` and ``diverged`` runs are never trained twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import __version__
from .train.config import TrainConfig, config_from_dict
from .train.loop import RunResult

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RUNNING, FAILED = "running", "failed"
DONE_STATUSES = ("finished", "diverged")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    steps INTEGER,
    diverged_step INTEGER,
    final TEXT,
    error TEXT,
    wall_time REAL,
    started_at REAL,
    ended_at REAL,
    host TEXT,
    normlab_version TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER,
    name TEXT NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, name, step);
"""

_ROW_INDEX = ("step", "epoch")


class StoreError(RuntimeError):
    """The run store cannot be opened or written."""


@dataclass
class RunRecord:
    """One stored run: its config, outcome and metrics."""

    key: str
    config: TrainConfig  # or another registered config type, see ``register_config``
    status: str
    steps: Optional[int] = None
    diverged_step: Optional[int] = None
    final: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    wall_time: Optional[float] = None
    error: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES


class RunStore:
    """Open (or create) the run store at ``path``.

    Raises:
        StoreError: the file is not a normlab store, was written by a newer normlab, or its
            folder is not writable.
    """

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            # check an existing file before the first write, so that a foreign database
            # or a store of a newer normlab is left as it is
            self._check_columns()
            self._reject_newer_schema()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                self._check_version()
        except StoreError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as error:
            raise StoreError(
                f"cannot open run store {self.path}: {error}; pass another --out folder or "
                "move the file away"
            ) from error
        except OSError as error:
            raise StoreError(
                f"cannot create run store {self.path}: {error}; pass a writable --out folder"
            ) from error

    def _transaction(self):
        return _Transaction(self._db, self.path)

    def _check_columns(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if not columns:  # no runs table yet: a new store
            return
        missing = {"key", "task", "config", "status", "final"} - columns
        if missing:
            raise StoreError(
                f"{self.path} is an SQLite database but not a normlab run store (its runs "
                f"table lacks {', '.join(sorted(missing))}); pass another --out folder"
            )

    def check_meta(self, name: str, value: str) -> Optional[str]:
        """Store ``value`` under ``name`` on first use; return the stored value."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO NOTHING", (name, value)
            )
            (stored,) = self._db.execute(
                "SELECT value FROM meta WHERE key=?", (name,)
            ).fetchone()
        return stored

    def _check_version(self) -> None:
        """Record the schema version in a new store; raise for a newer one."""
        if self._reject_newer_schema() is None:
            self._db.execute(
                "INSERT INTO meta VALUES ('schema_version', ?), ('created_by', ?)",
                (str(SCHEMA_VERSION), f"normlab {__version__}"),
            )

    def _reject_newer_schema(self) -> Optional[str]:
        """Return the stored schema version (None if there is none), raising if newer."""
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if not has_meta:  # a new file, before the schema is created
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            return None
        if int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"run store {self.path} has schema version {row[0]}, written by a newer "
                f"normlab; this is normlab {__version__} (schema {SCHEMA_VERSION}). Upgrade "
                "normlab or pass another --out folder"
            )
        return row[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------

    def start(self, config: TrainConfig) -> int:
        """Mark the run of ``config`` as running and return its row id."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO runs (key, task, config, seed, status) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO NOTHING",
                (config.key(), config.task, json.dumps(config.to_dict()), config.seed,
                 RUNNING),
            )
            self._db.execute(
                "UPDATE runs SET status=?, attempts=attempts+1, started_at=?, host=?, "
                "normlab_version=?, error=NULL WHERE key=?",
                (RUNNING, time.time(), socket.gethostname(), __version__, config.key()),
            )
            (run_id,) = self._db.execute(
                "SELECT id FROM runs WHERE key=?", (config.key(),)
            ).fetchone()
        return run_id

    def finish(self, run_id: int, result: RunResult) -> None:
        """Store the outcome and every metric of a run in one transaction."""
        rows = [(run_id, i + 1, None, "step_loss", _real(v)) for i, v in enumerate(result.step_loss)]
        for row in result.history:
            for name, value in row.items():
                if name not in _ROW_INDEX:
                    rows.append((run_id, row["step"], row.get("epoch"), name, _real(value)))
        with self._transaction():
            self._db.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            self._db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute(
                "UPDATE runs SET status=?, steps=?, diverged_step=?, final=?, wall_time=?, "
                "ended_at=? WHERE id=?",
                (
                    result.status,
                    result.steps,
                    result.diverged_step,
                    json.dumps({k: _real(v) for k, v in result.final.items()}),
                    result.wall_time,
                    time.time(),
                    run_id,
                ),
            )

    def fail(self, run_id: int, error: str, extra_attempts: int = 0) -> None:
        """Record that a run raised; the next sweep trains it again.

        ``extra_attempts`` adds attempts that ran without :meth:`start`, such as the retries
        that Ray makes on its own after a worker process dies.
        """
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET status=?, error=?, ended_at=?, attempts=attempts+? "
                "WHERE id=?",
                (FAILED, error, time.time(), extra_attempts, run_id),
            )

    # -- reading -----------------------------------------------------------------------

    def status(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT status FROM runs WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def load(self, key: str, with_metrics: bool = True) -> Optional[RunRecord]:
        """Return the stored run with ``key``, or None."""
        row = self._db.execute(
            "SELECT id, task, config, status, steps, diverged_step, final, wall_time, error "
            "FROM runs WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        run_id, task, config, status, steps, diverged_step, final, wall_time, error = row
        record = RunRecord(
            key=key,
            config=config_from_dict(task, json.loads(config)),
            status=status,
            steps=steps,
            diverged_step=diverged_step,
            final=_from_json(final),
            wall_time=wall_time,
            error=error,
        )
        if with_metrics:
            self._load_metrics(run_id, record)
        return record

    def _load_metrics(self, run_id: int, record: RunRecord) -> None:
        rows = self._db.execute(
            "SELECT step, epoch, name, value FROM metrics WHERE run_id=? ORDER BY step",
            (run_id,),
        ).fetchall()
        by_step: dict[int, dict] = {}
        for step, epoch, name, value in rows:
            value = math.nan if value is None else value
            if name == "step_loss":
                record.step_loss.append(value)
            else:
                by_step.setdefault(step, {"step": step, "epoch": epoch})[name] = value
        record.history = [by_step[s] for s in sorted(by_step)]

    def load_many(self, keys: Iterable[str]) -> dict[str, RunRecord]:
        records = {}
        for key in keys:
            record = self.load(key)
            if record is not None:
                records[key] = record
        return records

    def counts(self) -> dict[str, int]:
        """Return the number of stored runs per status."""
        rows = self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status")
        return dict(rows.fetchall())


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back when the body raises.

    SQLite errors (a full disk, a locked or damaged file) become :class:`StoreError`, so
    the command line reports them in one line. Runs committed before stay in the store.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise self._store_error(error) from error

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as error:
            # SQLite may keep a transaction open after a failed COMMIT (a full disk, an
            # I/O error), and it must be rolled back before the next write
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:
                    logger.warning("rollback of %s failed: %s", self._path, rollback_error)
            raise self._store_error(error) from error
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            raise self._store_error(exc) from exc

    def _store_error(self, error: BaseException) -> StoreError:
        return StoreError(
            f"cannot write run store {self._path}: {error}. Runs stored before are kept; "
            "fix the cause (for example free disk space) and run the same command again"
        )


def _real(value) -> Optional[float]:
    """Return a float that SQLite and JSON store faithfully (NaN and Inf become None)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _from_json(text: Optional[str]) -> dict:
    if not text:
        return {}
    return {k: (math.nan if v is None else v) for k, v in json.loads(text).items()}
