"""A SQLite file as leaderrun wrote it before file formats had numbers (format 0).

The DDL and the lease statements are copied verbatim from ``leaderrun/sqlite.py``
as of commit cf39fe6, the last version on the wall clock: expiry in Unix
seconds from ``julianday('now')``, and no ``PRAGMA user_version``. Tests build
such files to check that they are refused until ``leaderrun init``, that the
upgrade keeps their live leases live, and that an older leaderrun still running
against an upgraded file fails instead of misreading it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

LEASE_DDL = """
CREATE TABLE IF NOT EXISTS leader_lease (
    lock_key    INTEGER PRIMARY KEY,
    lock_name   TEXT,
    holder      TEXT,
    token       INTEGER NOT NULL,
    acquired_at REAL    NOT NULL,
    renewed_at  REAL    NOT NULL,
    expires_at  REAL    NOT NULL,
    host        TEXT,
    pid         INTEGER,
    command     TEXT,
    window_start REAL,
    window_ok    INTEGER
)"""

FIRST_LEASE_DDL = """
CREATE TABLE IF NOT EXISTS leader_lease (
    lock_key    INTEGER PRIMARY KEY,
    lock_name   TEXT,
    holder      TEXT,
    token       INTEGER NOT NULL,
    acquired_at REAL    NOT NULL,
    renewed_at  REAL    NOT NULL,
    expires_at  REAL    NOT NULL,
    host        TEXT,
    pid         INTEGER,
    command     TEXT
)"""
"""The first release's table (0d6888e): no --once-per columns, no history table."""

RUN_DDL = """
CREATE TABLE IF NOT EXISTS leader_run (
    lock_key     INTEGER NOT NULL,
    lock_name    TEXT,
    token        INTEGER NOT NULL,
    holder       TEXT    NOT NULL,
    host         TEXT,
    pid          INTEGER,
    command      TEXT,
    window_start REAL,
    started_at   REAL    NOT NULL,
    finished_at  REAL,
    exit_status  INTEGER,
    outcome      TEXT CHECK (outcome IN ('ok', 'failed', 'killed', 'timeout', 'lost')),
    PRIMARY KEY (lock_key, token)
)"""

ACQUIRE = """
INSERT INTO leader_lease AS l
    (lock_key, lock_name, holder, token, acquired_at, renewed_at, expires_at,
     host, pid, command, window_start, window_ok)
VALUES (:key, :name, :holder, 1,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0 + :lease_s,
        :host, :pid, :command, :window_start, NULL)
ON CONFLICT (lock_key) DO UPDATE
    SET lock_name = excluded.lock_name, holder = excluded.holder,
        token = l.token + 1, acquired_at = excluded.acquired_at,
        renewed_at = excluded.renewed_at, expires_at = excluded.expires_at,
        host = excluded.host, pid = excluded.pid, command = excluded.command,
        window_start = coalesce(excluded.window_start, l.window_start),
        window_ok = CASE WHEN excluded.window_start IS NULL THEN l.window_ok END
    WHERE (l.holder IS NULL
           OR l.expires_at <= (julianday('now') - 2440587.5) * 86400.0)
      AND l.lock_name IS excluded.lock_name
      AND NOT coalesce(l.window_start = excluded.window_start
                       AND NOT (:retry_failed AND l.window_ok IS NOT 1), 0)
RETURNING token"""

RENEW = """
UPDATE leader_lease
   SET expires_at = (julianday('now') - 2440587.5) * 86400.0 + :lease_s,
       renewed_at = (julianday('now') - 2440587.5) * 86400.0
 WHERE lock_key = :key AND holder = :holder AND token = :token
   AND expires_at > (julianday('now') - 2440587.5) * 86400.0"""

RELEASE = """
UPDATE leader_lease
   SET holder = NULL, expires_at = (julianday('now') - 2440587.5) * 86400.0
 WHERE lock_key = :key AND holder = :holder AND token = :token"""

HOLDER = """
SELECT holder, host, pid,
       expires_at - (julianday('now') - 2440587.5) * 86400.0, lock_name,
       coalesce(window_start = :window_start
                AND NOT (:retry_failed AND window_ok IS NOT 1), 0)
  FROM leader_lease WHERE lock_key = :key"""

SNAPSHOT = """
SELECT (julianday('now') - 2440587.5) * 86400.0, l.lock_key, l.lock_name,
       l.holder, l.token, l.acquired_at, l.renewed_at, l.expires_at, l.host,
       l.pid, l.command
  FROM (SELECT 1) AS one
  LEFT JOIN leader_lease AS l ON :key IS NULL OR l.lock_key = :key
 ORDER BY l.lock_name NULLS LAST, l.lock_key"""

OPERATOR_RELEASE = """
UPDATE leader_lease
   SET holder = CASE
           WHEN expires_at <= (julianday('now') - 2440587.5) * 86400.0 THEN NULL
           ELSE :revoked END
 WHERE lock_key = :key AND holder IS NOT NULL
   AND (:token IS NULL OR token = :token)
   AND (expires_at <= (julianday('now') - 2440587.5) * 86400.0
        OR (:force AND holder <> :revoked))
RETURNING (julianday('now') - 2440587.5) * 86400.0, lock_key, lock_name, holder,
          token, acquired_at, renewed_at, expires_at, host, pid, command"""

STATEMENTS = {
    "acquire": ACQUIRE,
    "renew": RENEW,
    "release": RELEASE,
    "holder": HOLDER,
    "status": SNAPSHOT,
    "operator release": OPERATOR_RELEASE,
}
"""Every lease statement of a format-0 leaderrun, by what it does."""

PARAMS = {
    "key": 1,
    "name": "x",
    "holder": "old:1:nonce",
    "token": 1,
    "lease_s": 30.0,
    "host": "old",
    "pid": 1,
    "command": "job",
    "window_start": None,
    "retry_failed": False,
    "revoked": "(revoked)",
    "force": True,
}
"""Values for every named parameter of :data:`STATEMENTS`."""


@dataclass(frozen=True)
class Row:
    """A lease row of a format-0 file, its times relative to the wall clock's now."""

    key: int
    name: str
    holder: str | None
    token: int
    acquired_ago_s: float
    renewed_ago_s: float
    expires_in_s: float


def make_file(
    path: Path, rows: list[Row], *, now_s: float, first_release: bool = False
) -> None:
    """Write a format-0 file at ``path``, in WAL mode, with ``rows`` and one run.

    ``now_s`` is the wall clock's now (Unix seconds) the rows' times count from.
    ``first_release`` writes the first release's table and no history table.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(FIRST_LEASE_DDL if first_release else LEASE_DDL)
        if not first_release:
            conn.execute(RUN_DDL)
        for row in rows:
            conn.execute(
                "INSERT INTO leader_lease (lock_key, lock_name, holder, token,"
                " acquired_at, renewed_at, expires_at, host, pid, command)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'old-host', 4242, 'backup.sh')",
                (
                    row.key,
                    row.name,
                    row.holder,
                    row.token,
                    now_s - row.acquired_ago_s,
                    now_s - row.renewed_ago_s,
                    now_s + row.expires_in_s,
                ),
            )
            if not first_release:
                conn.execute(
                    "INSERT INTO leader_run (lock_key, lock_name, token, holder,"
                    " host, pid, command, started_at, finished_at, exit_status,"
                    " outcome) VALUES (?, ?, ?, ?, 'old-host', 4242, 'backup.sh',"
                    " ?, ?, 0, 'ok')",
                    (
                        row.key,
                        row.name,
                        row.token - 1,
                        "old:0:nonce",
                        now_s - 3600.0,
                        now_s - 3500.0,
                    ),
                )
    finally:
        conn.close()
