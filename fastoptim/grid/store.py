"""Results store: one SQLite file (WAL) that any number of grid workers share.

A row per run, keyed by the run's config hash. A worker claims a run inside BEGIN IMMEDIATE (one writer at a time, so
two workers never both claim it), runs it, and writes the outcome. A claim is stale, and may be taken over, when its
worker's process is gone (same host) or its heartbeat is older than the lease (any host); a crashed run ('error') is
retried by the next claim. Finished runs are never run again: a killed grid restarts where it stopped.
"""

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass

from .runs import RunOutcome, RunSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    optimizer TEXT NOT NULL, model TEXT NOT NULL, ratio REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'error')),
    final_val_loss REAL, diverged INTEGER, steps INTEGER, seconds REAL,
    worker TEXT, host TEXT, pid INTEGER, heartbeat REAL,
    out_dir TEXT, error TEXT, started REAL, finished REAL, reason TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_regime ON runs (optimizer, model, ratio);
"""


# Columns added after the first stores were made: (name, SQL type), added to an older store when it is opened.
_ADDED_COLUMNS = (("reason", "TEXT"),)
_OUTCOME_COLUMNS = "final_val_loss, diverged, steps, seconds, reason"


@dataclass(frozen=True)
class StoredRun:
    spec: RunSpec
    status: str
    outcome: RunOutcome | None
    out_dir: str | None
    error: str | None  # a crashed run's exception (type: message, its last 4000 characters)
    started: float | None = None  # Unix times of the claim and of the result
    finished: float | None = None


class ResultsStore:
    def __init__(self, path, lease_s: float = 600.0, heartbeat_s: float = 30.0):
        self.path = str(path)
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.worker = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()
        self._stop = threading.Event()
        self._beat = None

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: commits are atomic and never corrupt the file; only a power cut may lose the last few.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def _add_missing_columns(self):
        with self._transaction() as db:
            present = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")

    def close(self):
        self.stop_heartbeat()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _transaction(self):
        return _Immediate(self._db)

    # ---- the preset this store belongs to ----

    def bind_preset(self, preset_json: str) -> None:
        """Record which preset the store serves; refuse a store made for a different grid."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='preset'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('preset', ?)", (preset_json,))
            elif row[0] != preset_json and not _same_grid(row[0], preset_json):
                name = json.loads(row[0]).get("name")
                raise ValueError(f"store {self.path} holds the grid of a different preset ({name!r}, or the same name "
                                 f"with other settings); give another --store path")

    def preset_json(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='preset'").fetchone()
        return row and row[0]

    # ---- provenance: what each grid session ran on (grid/provenance.py) ----

    def record_session(self, facts: dict) -> None:
        """Record (or update) this worker's session facts: one meta row per worker, so a grid resumed on another
        machine or at another commit keeps both records."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"session {self.worker}", json.dumps(facts)))

    def sessions(self) -> list[dict]:
        rows = self._db.execute("SELECT value FROM meta WHERE key LIKE 'session %'").fetchall()
        return sorted((json.loads(value) for value, in rows), key=lambda facts: facts.get("started") or 0.0)

    # ---- claims ----

    def result(self, run_id: str) -> RunOutcome | None:
        row = self._db.execute(f"SELECT {_OUTCOME_COLUMNS} FROM runs WHERE run_id=? AND status='done'",
                               (run_id,)).fetchone()
        return None if row is None else _outcome(row)

    def crashed(self, run_id: str) -> bool:
        """Whether the run's last attempt raised (it is retried by the next claim)."""
        row = self._db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row is not None and row[0] == "error"

    def claim(self, spec: RunSpec, out_dir: str) -> bool:
        """Take the run for this worker; False when it is finished or a live worker holds it."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status, host, pid, heartbeat FROM runs WHERE run_id=?", (spec.run_id,)).fetchone()
            if row is not None:
                status, host, pid, heartbeat = row
                if status == "done" or (status == "running" and not self._stale(host, pid, heartbeat, now)):
                    return False
            db.execute("INSERT OR REPLACE INTO runs (run_id, config, optimizer, model, ratio, status, worker, host, "
                       "pid, heartbeat, out_dir, started) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                       (spec.run_id, spec.canonical_json(), spec.optimizer, spec.model, float(spec.chinchilla),
                        self.worker, self.host, self.pid, now, out_dir, now))
            return True

    def _stale(self, host, pid, heartbeat, now) -> bool:
        if now - (heartbeat or 0.0) > self.lease_s:
            return True
        if host == self.host and pid is not None and pid != self.pid:
            return not _process_alive(pid)
        return False

    def finish(self, spec: RunSpec, outcome: RunOutcome) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET status='done', final_val_loss=?, diverged=?, steps=?, seconds=?, reason=?, "
                       "error=NULL, finished=? WHERE run_id=?",
                       (outcome.final_val_loss, int(outcome.diverged), outcome.steps, outcome.seconds, outcome.reason,
                        time.time(), spec.run_id))

    def fail(self, spec: RunSpec, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET status='error', error=?, finished=? WHERE run_id=? AND status='running'",
                       (error[-4000:], time.time(), spec.run_id))

    def release(self, spec: RunSpec) -> None:
        """Give back an unfinished claim of this worker (interrupted session): the run is unclaimed again."""
        with self._transaction() as db:
            db.execute("DELETE FROM runs WHERE run_id=? AND status='running' AND worker=?", (spec.run_id, self.worker))

    # ---- heartbeat: keeps this worker's claims alive while long runs train ----

    def start_heartbeat(self) -> None:
        if self._beat is None:
            self._stop.clear()
            self._beat = threading.Thread(target=self._beat_loop, name="fastoptim-grid-heartbeat", daemon=True)
            self._beat.start()

    def stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None

    def _beat_loop(self):
        db = self._connect()
        try:
            while not self._stop.wait(self.heartbeat_s):
                db.execute("UPDATE runs SET heartbeat=? WHERE worker=? AND status='running'",
                           (time.time(), self.worker))
        finally:
            db.close()

    # ---- reading ----

    def runs(self, status: str | None = None) -> list[StoredRun]:
        query = f"SELECT config, status, {_OUTCOME_COLUMNS}, out_dir, error, started, finished FROM runs"
        rows = self._db.execute(query + (" WHERE status=?" if status else "") + " ORDER BY started",
                                (status,) if status else ()).fetchall()
        return [StoredRun(RunSpec.from_config(json.loads(config)), state,
                          _outcome(rest[:5]) if state == "done" else None, *rest[5:])
                for config, state, *rest in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())

    def mean_seconds(self) -> float | None:
        """Mean duration of the finished runs (all workers, all sessions): the ETA of a resumed grid."""
        query = "SELECT AVG(seconds) FROM runs WHERE status='done' AND seconds IS NOT NULL"
        return self._db.execute(query).fetchone()[0]


class _Immediate:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error): takes the write lock up front, so read-then-write is atomic."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _same_grid(stored: str, given: str) -> bool:
    """Whether two preset JSONs describe one grid: a store written before a preset field existed lacks it, and
    reads back with that field's default."""
    from .presets import GridPreset

    return GridPreset.from_json(stored) == GridPreset.from_json(given)


def _outcome(row) -> RunOutcome:
    loss, diverged, steps, seconds, reason = row
    return RunOutcome(float("nan") if loss is None else loss, bool(diverged), steps, seconds, reason)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
