"""The SQLite lease store: leases in one file, for every process of one host.

The only module that imports ``sqlite3``. It keeps the store contract
(:mod:`leaderrun.stores.base`) as PostgreSQL does: one ``leader_lease`` row per
lock, taken by an upsert only when it is free or expired, renewed and released
by a compare-and-swap on holder and token, and never deleted, so the fencing
token only grows. What it does as PostgreSQL does is the shared session's
(:class:`leaderrun.stores.sql.SqlSession`); this module has its queries, each
one write transaction (:data:`QUERIES`), its file and its errors.

Time: the host's ``CLOCK_BOOTTIME`` decides (``docs/safety.md``, *On one host,
the host's unsteppable clock decides*). A lease row keeps its expiry in boot
seconds with the boot id they count in; a row of another boot (or of none) is
expired, since every process of that boot is gone. Every write is one ``BEGIN
IMMEDIATE`` transaction that reads the clock *after* it has taken the file's
write lock, so each writer's now is at least every earlier writer's, and the
holder's kill deadline, measured on the same clock from before it sent the
statement, falls before the expiry the statement wrote. The wall clock is stored
only for people and calendars: the times ``status`` and ``history`` show and the
``--once-per`` window; it never decides a lease, so a step of it (timesyncd,
chrony's ``makestep``, a VM resume, ``date -s``) frees nothing early.

File format: ``PRAGMA application_id`` marks the file as leaderrun's and
``PRAGMA user_version`` is its format (:data:`FORMAT`). A file of an older
format is refused until ``leaderrun init`` upgrades it through :data:`STEPS`; a
newer one is refused; a ``leader_lease`` or ``leader_run`` table leaderrun did
not create is refused and never altered. Each format renames the columns an
older leaderrun's statements use, so an older leaderrun still running against
an upgraded file fails loudly instead of misreading boot seconds as Unix time.

Locking and bounds: the file is in WAL mode, so readers never block the
writer. A connection has no busy handler of SQLite's; a statement that finds
the write lock taken is retried here, for at most ``busy_s`` (the renewal
attempt budget), and each call runs on a worker thread through
:func:`leaderrun.bounded.call_bounded`, so a signal to the waiting thread gives
it up at once and a stuck disk cannot hold the caller past ``busy_s`` plus
:data:`STATEMENT_ALLOWANCE_S`. A session whose call was given up is dead.
``synchronous=FULL`` makes each commit durable before it returns: a fencing
token handed to a child must not be handed out again after a power cut.

Where: WAL needs shared memory and POSIX locks of one kernel, so the file must
be on a file system known to be local (:mod:`leaderrun.stores.host`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from leaderrun.clock import boottime
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
    StatementTimeoutError,
)
from leaderrun.lease import LockId
from leaderrun.stores.base import RUN_TABLE, TABLE, InitOutcome, Row
from leaderrun.stores.host import (
    VOLATILE_FS_TYPES,
    HostClock,
    Instant,
    fs_refusal,
    mount_fs_type,
    read_mountinfo,
)
from leaderrun.stores.sql import SqlSession, SqlStore, columns_of

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")

MIN_SQLITE_VERSION = (3, 35, 0)
"""RETURNING, which the acquire needs, came in SQLite 3.35."""

MIN_BUSY_S = 0.1
"""The shortest wait for SQLite's write lock (seconds), whatever the budget."""

STATEMENT_ALLOWANCE_S = 1.0
"""How long a call may run past its wait for the lock (a slow fsync) before it is
abandoned, in seconds."""

BUSY_PAUSES_S = (0.001, 0.002, 0.005, 0.01, 0.02)
"""Pauses between attempts to take a lock another connection holds, then the last
one repeated (seconds): short, since the lock is held for a few statements."""

APPLICATION_ID = 0x6C64726E
"""``PRAGMA application_id`` of a leaderrun file ("ldrn"); ``file(1)`` shows it."""

DEFAULT_PATH_HINT = "--dsn sqlite:///var/lib/leaderrun/leases.db"
"""Where a file of leaderrun's own could be, for messages."""

# --- the file format -----------------------------------------------------------------
#
# Format 1: the lease's timing is in boot seconds of the boot named by boot_id;
# the wall clock (Unix seconds) is kept for display only, in *_unix_s columns.
# Format 2: the lease row records the cadence (JSON) of its last slotted run.
# Format 3: the lease row counts runs by outcome and keeps the last success;
# a run keeps its captured output.

_LEASE_DDL = """
CREATE TABLE leader_lease (
    lock_key        INTEGER PRIMARY KEY,
    lock_name       TEXT,
    holder          TEXT,
    token           INTEGER NOT NULL,
    boot_id         TEXT,
    acquired_boot_s REAL,
    expires_boot_s  REAL,
    acquired_unix_s REAL,
    renewed_unix_s  REAL,
    host            TEXT,
    pid             INTEGER,
    command         TEXT,
    window_start    REAL,
    window_ok       INTEGER,
    cadence         TEXT,
    runs_ok         INTEGER NOT NULL DEFAULT 0,
    runs_failed     INTEGER NOT NULL DEFAULT 0,
    runs_killed     INTEGER NOT NULL DEFAULT 0,
    runs_timeout    INTEGER NOT NULL DEFAULT 0,
    runs_lost       INTEGER NOT NULL DEFAULT 0,
    last_ok_unix_s  REAL
)"""

_RUN_DDL = """
CREATE TABLE leader_run (
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
    output       TEXT,
    PRIMARY KEY (lock_key, token)
)"""


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


Shapes = Mapping[str, tuple[frozenset[str], ...]]
"""The column sets each of leaderrun's tables may have in one format."""

_LEASE_COLUMNS_0 = _names(
    "lock_key lock_name holder token acquired_at renewed_at expires_at host pid command"
)
_WINDOW_COLUMNS = _names("window_start window_ok")
_LEASE_COLUMNS_1 = _names(
    "lock_key lock_name holder token boot_id acquired_boot_s expires_boot_s "
    "acquired_unix_s renewed_unix_s host pid command window_start window_ok"
)
_LEASE_COLUMNS_2 = _LEASE_COLUMNS_1 | _names("cadence")
_RUN_COLUMNS_0 = _names(
    "lock_key lock_name token holder host pid command window_start started_at "
    "finished_at exit_status outcome"
)


@dataclass(frozen=True)
class Step:
    """One upgrade of the file format, run by ``leaderrun init``.

    ``apply`` runs inside the write transaction that also stamps the new format,
    with the clock read under the lock; it returns a note for the log.
    ``shape_before`` is what the tables looked like in the format it upgrades
    from, so that a file of that format (even an unstamped one) is recognized.
    """

    to_format: int
    summary: str
    apply: Callable[[sqlite3.Connection, Instant], str]
    shape_before: Shapes


# Format 0 to 1. Each wall-clock time T becomes now_boot + (T - now_unix): the
# same distance from now, on the boot clock of this boot.
_LEASES_FROM_FORMAT_0 = """
INSERT INTO leader_lease
    (lock_key, lock_name, holder, token, boot_id, acquired_boot_s, expires_boot_s,
     acquired_unix_s, renewed_unix_s, host, pid, command, window_start, window_ok)
SELECT lock_key, lock_name, holder, token, :boot_id,
       :boot_s + (acquired_at - :unix_s), :boot_s + (expires_at - :unix_s),
       acquired_at, renewed_at, host, pid, command, window_start, window_ok
  FROM leader_lease_format0"""

_LIVE_IN_FORMAT_0 = """
SELECT count(*) FROM leader_lease_format0
 WHERE holder IS NOT NULL AND expires_at > :unix_s"""


def _to_boot_clock(conn: sqlite3.Connection, now: Instant) -> str:
    """Format 0 to 1: lease times move from the wall clock to CLOCK_BOOTTIME.

    Every time is converted at this instant, so a lease live now keeps exactly
    the time it had left, and an older leaderrun still holding it stops its
    child before then, as it would have (it can no longer renew: its statements
    name ``expires_at``, which is gone). The table is rebuilt, not altered
    column by column, so that an upgraded file has the same schema as a new one.
    """
    params = {"boot_id": now.boot_id, "boot_s": now.boot_s, "unix_s": now.unix_s}
    live = 0
    if TABLE in _columns(conn):
        for column, kind in (("window_start", "REAL"), ("window_ok", "INTEGER")):
            if column not in _columns(conn)[TABLE]:
                conn.execute(f"ALTER TABLE leader_lease ADD COLUMN {column} {kind}")
        conn.execute("ALTER TABLE leader_lease RENAME TO leader_lease_format0")
        conn.execute(_LEASE_DDL)
        (live,) = conn.execute(_LIVE_IN_FORMAT_0, params).fetchone()
        conn.execute(_LEASES_FROM_FORMAT_0, params)
        conn.execute("DROP TABLE leader_lease_format0")
    else:
        conn.execute(_LEASE_DDL)
    if RUN_TABLE not in _columns(conn):
        conn.execute(_RUN_DDL)
    return f"{live} live lease(s) converted to the boot clock"


def _rebuild(conn: sqlite3.Connection, table: str, ddl: str) -> bool:
    """Rebuild ``table`` from today's ``ddl``, keeping every row and column it had.

    Rebuilt rather than altered column by column, so that an upgraded file has
    the same schema as a new one (SQLite's ALTER leaves its mark in the DDL).
    False when the table already has today's columns.
    """
    had = _columns(conn)[table]
    if set(had) == set(columns_of(ddl)):
        return False
    kept = ", ".join(c for c in had if c in columns_of(ddl))
    conn.execute(f"ALTER TABLE {table} RENAME TO {table}_before")
    conn.execute(ddl)
    # Our own table and column names, read from our DDL and the catalog.
    copy = f"INSERT INTO {table} ({kept}) SELECT {kept} FROM {table}_before"  # noqa: S608
    conn.execute(copy)
    conn.execute(f"DROP TABLE {table}_before")
    return True


def _add_cadence(conn: sqlite3.Connection, now: Instant) -> str:
    """Format 1 to 2: a column for the cadence of the lock's last slotted run."""
    del now  # nothing converts: the column starts empty
    _rebuild(conn, TABLE, _LEASE_DDL)
    return "the lease table records each lock's cadence"


def _add_counters(conn: sqlite3.Connection, now: Instant) -> str:
    """Format 2 to 3: run counters and the last success; a run's captured output."""
    del now  # the counters start at zero: nothing was counted before
    _rebuild(conn, TABLE, _LEASE_DDL)
    _rebuild(conn, RUN_TABLE, _RUN_DDL)
    return "runs are counted by outcome from now on"


STEPS: tuple[Step, ...] = (
    Step(
        1,
        "lease times on CLOCK_BOOTTIME, not the wall clock",
        _to_boot_clock,
        # Before formats had numbers: Unix seconds from julianday('now'). The
        # first release had neither the --once-per columns nor the history table.
        {
            TABLE: (_LEASE_COLUMNS_0, _LEASE_COLUMNS_0 | _WINDOW_COLUMNS),
            RUN_TABLE: (_RUN_COLUMNS_0,),
        },
    ),
    Step(
        2,
        "the lease row records the cadence of its last slotted run",
        _add_cadence,
        {TABLE: (_LEASE_COLUMNS_1,), RUN_TABLE: (_RUN_COLUMNS_0,)},
    ),
    Step(
        3,
        "run counters and the last success in the lease row, output in the run",
        _add_counters,
        {TABLE: (_LEASE_COLUMNS_2,), RUN_TABLE: (_RUN_COLUMNS_0,)},
    ),
)
"""Every upgrade, in order; ``STEPS[n]`` upgrades format ``n`` to ``n + 1``.

A new lease column is a line of :data:`_LEASE_DDL` and a step here, whose
``shape_before`` keeps the columns the format had until then.
"""

FORMAT = STEPS[-1].to_format
"""The file format this leaderrun reads and writes (``PRAGMA user_version``)."""

SHAPES: Mapping[int, Shapes] = {
    **{step.to_format - 1: step.shape_before for step in STEPS},
    FORMAT: {
        TABLE: (frozenset(columns_of(_LEASE_DDL)),),
        RUN_TABLE: (frozenset(columns_of(_RUN_DDL)),),
    },
}
"""The column sets of leaderrun's own tables in each format: how a file of an
older leaderrun that predates ``user_version`` is told from a stranger's. This
format's are read from the DDL."""


class Shape(StrEnum):
    """What a file holds, as far as leaderrun is concerned."""

    new = "new"
    """None of leaderrun's tables (a new or empty file): created on first use."""
    current = "current"
    """leaderrun's tables in this version's format (some may be missing)."""
    older = "older"
    """An older leaderrun's tables: ``leaderrun init`` upgrades them."""
    newer = "newer"
    """A newer leaderrun's format: this version cannot read it."""
    foreign = "foreign"
    """Another application's tables or file: leaderrun leaves it alone."""


@dataclass(frozen=True)
class FileFormat:
    """The verdict on a file: its :class:`Shape`, and what it rests on."""

    shape: Shape
    version: int | None = None
    """The format number, for leaderrun's own files."""
    detail: str = ""
    """For a foreign file: what was found, for the message."""
    missing: tuple[str, ...] = ()
    """Of leaderrun's tables, those the file lacks (created on first use)."""


def file_format(
    application_id: int, user_version: int, tables: Mapping[str, Sequence[str]]
) -> FileFormat:
    """Decide what a file is from its header and the columns of leaderrun's tables.

    ``tables`` maps each of ``leader_lease`` and ``leader_run`` present in the
    file to its column names. A file stamped with :data:`APPLICATION_ID` is
    leaderrun's, of format ``user_version``; an unstamped one is judged by the
    shape of its tables (a format-0 file predates stamps).
    """
    missing = tuple(name for name in (TABLE, RUN_TABLE) if name not in tables)
    if application_id == APPLICATION_ID:
        if user_version > FORMAT:
            return FileFormat(Shape.newer, user_version)
        candidates = [user_version]
    elif application_id != 0:
        return FileFormat(
            Shape.foreign, detail=f"its PRAGMA application_id is {application_id}"
        )
    elif user_version != 0:
        # Another program numbers its schema here; stamping ours would break it.
        return FileFormat(
            Shape.foreign, detail=f"its PRAGMA user_version is {user_version}"
        )
    elif not tables:
        return FileFormat(Shape.new, missing=missing)
    else:
        # Unstamped: a format-0 file (formats had no numbers then), or tables
        # created by hand from `init --print-sql` without its PRAGMAs.
        candidates = sorted(SHAPES)
    for name, columns in sorted(tables.items()):
        if not any(_fits(version, {name: columns}) for version in candidates):
            return FileFormat(
                Shape.foreign,
                detail=f"a {name} table with columns {', '.join(columns)}",
            )
    fitting = [version for version in candidates if _fits(version, tables)]
    if not fitting:
        names = " and ".join(sorted(tables))
        return FileFormat(
            Shape.foreign, detail=f"{names} tables of different leaderrun formats"
        )
    version = fitting[0]
    if version < FORMAT:
        return FileFormat(Shape.older, version, missing=missing)
    return FileFormat(Shape.current, version, missing=missing)


def _fits(version: int, tables: Mapping[str, Sequence[str]]) -> bool:
    """Whether every table given has one of format ``version``'s column sets."""
    shapes = SHAPES.get(version, {})
    return all(
        frozenset(columns) in shapes.get(name, ()) for name, columns in tables.items()
    )


# --- the statements ------------------------------------------------------------------
#
# Parameters :boot_id, :boot_s and :unix_s are one Instant, read in Python under
# the write lock. The expiry test is spelled out in each statement (no string
# building): a lease is live while its row names a holder, this boot, and an
# expiry later than now on the boot clock.

# One statement takes the lock when it is free or expired, bumping the token in
# the same row. The key-collision test mirrors PostgreSQL's IS NOT DISTINCT FROM.
_ACQUIRE = """
INSERT INTO leader_lease AS l
    (lock_key, lock_name, holder, token, boot_id, acquired_boot_s, expires_boot_s,
     acquired_unix_s, renewed_unix_s, host, pid, command, window_start, window_ok,
     cadence)
VALUES (:key, :name, :holder, 1, :boot_id, :boot_s, :boot_s + :lease_s,
        :unix_s, :unix_s, :host, :pid, :command, :window_start, NULL, :cadence)
ON CONFLICT (lock_key) DO UPDATE
    SET lock_name = excluded.lock_name, holder = excluded.holder,
        token = l.token + 1, boot_id = excluded.boot_id,
        acquired_boot_s = excluded.acquired_boot_s,
        expires_boot_s = excluded.expires_boot_s,
        acquired_unix_s = excluded.acquired_unix_s,
        renewed_unix_s = excluded.renewed_unix_s,
        host = excluded.host, pid = excluded.pid, command = excluded.command,
        window_start = coalesce(excluded.window_start, l.window_start),
        window_ok = CASE WHEN excluded.window_start IS NULL THEN l.window_ok END,
        cadence = coalesce(excluded.cadence, l.cadence)
    WHERE (l.holder IS NULL OR l.boot_id IS NOT :boot_id
           OR l.expires_boot_s <= :boot_s)
      AND l.lock_name IS excluded.lock_name
      AND NOT coalesce(l.window_start = excluded.window_start
                       AND NOT (:retry_failed AND l.window_ok IS NOT 1), 0)
RETURNING token"""

# Only when the acquire took nothing, in the same transaction: who holds it, for
# the message and for how long a waiter sleeps.
_HOLDER = """
SELECT 0 AS acquired, token, holder, host, pid,
       CASE WHEN boot_id IS :boot_id THEN expires_boot_s - :boot_s ELSE 0.0 END
           AS expires_in_s,
       lock_name, :window_start AS window_start,
       coalesce(window_start = :window_start
                AND NOT (:retry_failed AND window_ok IS NOT 1), 0) AS window_done
  FROM leader_lease WHERE lock_key = :key"""

_PREVIOUS = "SELECT token, renewed_unix_s FROM leader_lease WHERE lock_key = :key"

# Runs whose holder died are closed as lost, at their last renewal if known.
_CLOSE_LOST = """
UPDATE leader_run
   SET outcome = 'lost',
       finished_at = coalesce(
           CASE WHEN token = :prev_token THEN :prev_renewed END, :unix_s)
 WHERE lock_key = :key AND finished_at IS NULL
   AND token < :token AND token > :token - :keep"""

_START_RUN = """
INSERT INTO leader_run
    (lock_key, lock_name, token, holder, host, pid, command, window_start,
     started_at)
VALUES (:key, :name, :token, :holder, :host, :pid, :command, :window_start,
        :unix_s)
ON CONFLICT (lock_key, token) DO UPDATE
    SET lock_name = excluded.lock_name, holder = excluded.holder,
        host = excluded.host, pid = excluded.pid, command = excluded.command,
        window_start = excluded.window_start, started_at = excluded.started_at,
        finished_at = NULL, exit_status = NULL, outcome = NULL"""

_PRUNE = "DELETE FROM leader_run WHERE lock_key = :key AND token <= :token - :keep"

_COUNT_LOST = (
    "UPDATE leader_lease SET runs_lost = runs_lost + :lost WHERE lock_key = :key"
)

# Whether the run is still open: a run another node closed as lost was counted.
_RUN_OPEN = """
SELECT finished_at IS NULL FROM leader_run
 WHERE lock_key = :key AND token = :token AND holder = :holder"""

# Closes the run, overriding a 'lost' that another node guessed (the holder
# knows better how it ended) but keeping the guessed finish.
_FINISH_RUN = """
UPDATE leader_run
   SET finished_at = coalesce(finished_at, :unix_s), exit_status = :exit_status,
       outcome = :outcome, output = :output
 WHERE :outcome IS NOT NULL AND :started
   AND lock_key = :key AND token = :token AND holder = :holder
   AND (finished_at IS NULL OR outcome = 'lost')"""

# A run that never started leaves no trace.
_DROP_RUN = """
DELETE FROM leader_run
 WHERE NOT :started AND lock_key = :key AND token = :token AND holder = :holder"""

# A compare-and-swap on (holder, token), as in PostgreSQL; and, as there, an
# expired lease is not revived by a renewal that comes too late to count.
_RENEW = """
UPDATE leader_lease
   SET expires_boot_s = :boot_s + :lease_s, renewed_unix_s = :unix_s
 WHERE lock_key = :key AND holder = :holder AND token = :token
   AND boot_id IS :boot_id AND expires_boot_s > :boot_s"""

# Release keeps the row, and so the token, for the life of the file. With
# --min-hold, the same holder keeps the lease until acquired + min_hold.
_RELEASE = """
UPDATE leader_lease
   SET holder = CASE WHEN acquired_boot_s + :min_hold_s > :boot_s THEN holder END,
       expires_boot_s = max(:boot_s, acquired_boot_s + :min_hold_s),
       window_ok = CASE WHEN :started THEN coalesce(:window_ok, window_ok) END,
       window_start = CASE WHEN :started THEN window_start END,
       runs_ok = runs_ok + (:once AND :outcome = 'ok'),
       runs_failed = runs_failed + (:once AND :outcome = 'failed'),
       runs_killed = runs_killed + (:once AND :outcome = 'killed'),
       runs_timeout = runs_timeout + (:once AND :outcome = 'timeout'),
       runs_lost = runs_lost + (:once AND :outcome = 'lost'),
       last_ok_unix_s = CASE WHEN :once AND :outcome = 'ok' THEN :unix_s
                             ELSE last_ok_unix_s END
 WHERE lock_key = :key AND holder = :holder AND token = :token"""

# A run with no outcome is 'running' while its lease (same token) is live, and
# otherwise lost: its holder died and nobody has taken the lock since.
_RUN_SELECT = """
SELECT r.lock_key, r.lock_name, r.token, r.holder, r.host, r.pid, r.command,
       r.window_start, r.started_at, r.finished_at, r.exit_status,
       coalesce(r.outcome,
                CASE WHEN l.token = r.token AND l.holder IS NOT NULL
                          AND l.boot_id IS :boot_id AND l.expires_boot_s > :boot_s
                     THEN 'running' ELSE 'lost' END) AS outcome,
       coalesce(r.finished_at,
                CASE WHEN l.token = r.token THEN min(l.renewed_unix_s, :unix_s) END,
                :unix_s) - r.started_at AS duration_s
  FROM leader_run r LEFT JOIN leader_lease l ON l.lock_key = r.lock_key"""

_HISTORY = (
    _RUN_SELECT
    + """
 WHERE :key IS NULL OR r.lock_key = :key
 ORDER BY r.started_at DESC, r.lock_key, r.token DESC
 LIMIT :limit"""
)

_RUN_OUTPUT = """
SELECT token, output FROM leader_run
 WHERE lock_key = :key AND (:token IS NULL OR token = :token)
 ORDER BY token DESC LIMIT 1"""

_LAST_RUNS = (
    _RUN_SELECT  # noqa: S608 - constant SQL, no value is formatted in
    + """
 WHERE r.token = (SELECT max(token) FROM leader_run m WHERE m.lock_key = r.lock_key)
 ORDER BY r.lock_key"""
)

# One statement, so that even no row gives the instant of the read: the LEFT
# JOIN from a one-row relation returns it when there is no lease at all.
_SNAPSHOT = """
SELECT :unix_s AS db_now, l.*
  FROM (SELECT 1) AS one
  LEFT JOIN leader_lease AS l ON :key IS NULL OR l.lock_key = :key
 ORDER BY l.lock_name NULLS LAST, l.lock_key"""

# release, as in PostgreSQL: one conditional UPDATE decides. An expired lease
# is cleared; with force, a live one is revoked (a holder no renewal matches,
# its expiry kept, so nobody takes it before the old holder had to stop its
# child). The token is never touched. RETURNING gives the row as updated.
_OPERATOR_RELEASE = """
UPDATE leader_lease
   SET holder = CASE
           WHEN boot_id IS NOT :boot_id OR expires_boot_s <= :boot_s THEN NULL
           ELSE :revoked END
 WHERE lock_key = :key AND holder IS NOT NULL
   AND (:token IS NULL OR token = :token)
   AND (boot_id IS NOT :boot_id OR expires_boot_s <= :boot_s
        OR (:force AND holder <> :revoked))
RETURNING :unix_s AS db_now, *"""

_HEADER = """
SELECT application_id, user_version FROM pragma_application_id, pragma_user_version"""

_TABLE_COLUMNS = """
SELECT m.name, c.name
  FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS c
 WHERE m.type = 'table' AND m.name IN ('leader_lease', 'leader_run')
 ORDER BY m.name, c.cid"""


def setup_sql() -> str:
    """The SQL that ``leaderrun init`` runs on a new SQLite file (``--print-sql``)."""
    return (
        f"-- leaderrun's tables in a SQLite file, format {FORMAT}. Lease times are\n"
        "-- CLOCK_BOOTTIME seconds of the boot named by boot_id; *_unix_s and the\n"
        "-- history's times are Unix seconds, for display only. leaderrun also\n"
        "-- sets synchronous = FULL on each connection. Never delete rows: the\n"
        "-- fencing token must keep increasing. An older leaderrun's file is\n"
        "-- upgraded by `leaderrun init`, not by this SQL.\n"
        "PRAGMA journal_mode = WAL;\n"
        "BEGIN IMMEDIATE;\n"
        + _LEASE_DDL.strip()
        + ";\n"
        + _RUN_DDL.strip()
        + ";\n"
        + f"PRAGMA application_id = {APPLICATION_ID};\n"
        + f"PRAGMA user_version = {FORMAT};\n"
        + "COMMIT;\n"
    )


class SqliteLeaseStore(SqlStore["SqliteSession"]):
    """Leases in the ``leader_lease`` table of one SQLite file, for one host.

    Args:
        path: the database file (absolute); created with its tables on first use.
        busy_s: how long a statement waits for another process's write lock;
            the renewal attempt budget, so a wait never outlasts an attempt.
        create: create the tables on first use if the file has none.
        vouched_fs: file system types the operator vouches are local
            (``LEADERRUN_SQLITE_LOCAL_FS``,
            :func:`leaderrun.stores.host.vouched_fs_types`).
        clock: the host's clocks; read from ``/proc`` by default.

    Raises:
        ConfigError: the directory does not exist, or is on a file system not
            known to be local, or ``/proc`` cannot tell.
        DatabaseUnavailableError: this Python's SQLite is too old.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_s: float = 5.0,
        create: bool = True,
        vouched_fs: Iterable[str] = (),
        clock: HostClock | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.busy_s = max(MIN_BUSY_S, busy_s)
        """How long a call waits for another process's write lock, in seconds."""
        super().__init__(
            create=create, bound_s=self.busy_s + STATEMENT_ALLOWANCE_S, labels=labels
        )
        # rwc creates a missing file; rw (status, release) never does.
        mode = "rwc" if create else "rw"
        self._target = f"file:{quote(str(path))}?mode={mode}"
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise DatabaseUnavailableError(
                f"SQLite {sqlite3.sqlite_version} is too old for leaderrun (it needs "
                f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or later); use a newer "
                "Python or a PostgreSQL DSN"
            )
        directory = path.parent
        if not directory.is_dir():
            raise ConfigError(
                f"sqlite://{path}: directory {str(directory)!r} does not "
                "exist; create it (writable by every user of the lock) first"
            )
        self.fs_type = self._check_file_system(frozenset(vouched_fs))
        self.clock = clock if clock is not None else HostClock.read()

    def _check_file_system(self, vouched: frozenset[str]) -> str:
        """The file system type holding the file; ConfigError unless it is local.

        The file's real location decides (a symlink may lead elsewhere), and so
        does its directory, where the -wal and -shm files go; a file
        bind-mounted into place is a mount of its own.
        """
        mountinfo = read_mountinfo()
        real = self.path.resolve()
        found = "unknown"
        for where in (str(real.parent), str(real)):
            fs_type = mount_fs_type(where, mountinfo)
            refusal = fs_refusal(where, fs_type, vouched)
            if refusal is not None:
                raise ConfigError(f"sqlite://{self.path}: {refusal}")
            found = fs_type or found
        return found

    def describe(self) -> str:
        """The database file's path."""
        return f"sqlite://{self.path}"

    def session(self) -> SqliteSession:
        """A session on the file; it opens the file on its first call."""
        return SqliteSession(self)

    def new_connection(self) -> sqlite3.Connection:
        """Open the file: autocommit, no busy handler, synchronous=FULL.

        SQLite's busy handler would wait inside the library, where nothing can
        end the wait early; the session retries on SQLITE_BUSY itself instead.
        """
        conn = sqlite3.connect(
            self._target,
            uri=True,
            timeout=0,
            isolation_level=None,  # autocommit: BEGIN IMMEDIATE is ours to issue
            check_same_thread=False,  # one thread at a time, not always one
        )
        try:
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def missing(self) -> SchemaMissingError:
        """The error for a file without the lease table, saying to run init."""
        return SchemaMissingError(
            f"{self.path} has no {TABLE} table; run `leaderrun init --dsn "
            f"sqlite://{self.path}` (or any leaderrun run with it) first"
        )

    def refusal(self, found: FileFormat) -> LeaderrunError | None:
        """The error for a file this version must not use as it is; None if usable."""
        if found.shape is Shape.older:
            return SchemaMissingError(
                f"{self.path} was written by an older leaderrun (file format "
                f"{found.version}, this one uses {FORMAT}); run `leaderrun init "
                f"--dsn sqlite://{self.path}` to upgrade it (live leases stay live)"
            )
        if found.shape is Shape.newer:
            return DatabaseUnavailableError(
                f"{self.path} was written by a newer leaderrun (file format "
                f"{found.version}, this one knows up to {FORMAT}); upgrade leaderrun "
                "on this host"
            )
        if found.shape is Shape.foreign:
            return ConfigError(
                f"{self.path} is not leaderrun's: {found.detail}; leaderrun never "
                f"alters what it did not create, so give it a file of its own, e.g. "
                f"{DEFAULT_PATH_HINT}"
            )
        return None

    def error(self, exc: sqlite3.Error, doing: str) -> DatabaseUnavailableError:
        """The leaderrun error for a sqlite3 error, naming the file and what to do."""
        name = getattr(exc, "sqlite_errorname", "")
        text = str(exc) or type(exc).__name__
        if "no such table" in text:
            return self.missing()
        if _is_busy(exc):
            return self.busy(doing)
        cant_open = name.startswith("SQLITE_CANTOPEN")
        if cant_open and not self.create and not self.path.exists():
            return self.missing()
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return DatabaseUnavailableError(
                f"{doing} in {self.path}: {text}; the file, its directory and its "
                "-wal and -shm files must be writable by every user of the lock"
            )
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return DatabaseUnavailableError(
                f"{doing} in {self.path}: {text}; is it a leaderrun SQLite database?"
            )
        return DatabaseUnavailableError(f"{doing} in {self.path}: {text}")

    def busy(self, doing: str) -> StatementTimeoutError:
        """The error for a wait for the write lock that lasted all of ``busy_s``."""
        return StatementTimeoutError(
            f"{doing} in {self.path}: another process held its write lock for "
            f"more than {self.busy_s:.3g}s"
        )


class _GivenUp(Exception):
    """The caller gave the call up; the worker stops retrying (nobody sees this)."""


class SqliteSession(SqlSession):
    """One connection to the file, used by one thread at a time.

    Every method is one call on a worker thread, bounded by the store's
    ``bound_s``; a call that finds the file's write lock taken is retried
    there for at most ``busy_s``. A call given up leaves the session dead (see
    :class:`~leaderrun.stores.sql.SqlSession`).
    """

    _store: SqliteLeaseStore
    _thread_name = "leaderrun-sqlite"

    def __init__(self, store: SqliteLeaseStore) -> None:
        super().__init__(store)
        self._conn: sqlite3.Connection | None = None
        self._giving_up = threading.Event()
        """Set when a call is given up: its retries stop waiting for the lock."""

    def table_exists(self) -> bool:
        """Whether the file has the lease table."""
        return TABLE in self._call("reading the schema", _columns)

    # --- the file's format ---------------------------------------------------------

    def prepare(self) -> None:
        """Check the file is this version's, switch it to WAL, create missing tables.

        In WAL mode and synchronous=FULL; nothing is changed in a file that is
        not leaderrun's or not of this format; with ``create`` off, nothing is
        created either.

        Raises:
            SchemaMissingError: the file was written by an older leaderrun (run
                ``leaderrun init``), or it is missing and ``create`` is off.
            ConfigError: a ``leader_lease`` or ``leader_run`` table that is not
                leaderrun's, or another application's file.
            DatabaseUnavailableError: a newer leaderrun's file, or the file
                cannot be opened or used.
            StatementTimeoutError: another process kept the file locked.
        """
        create = self._store.create

        def opening(conn: sqlite3.Connection) -> FileFormat:
            found = _read_format(conn)
            usable = self._store.refusal(found) is None
            if usable and (create or found.shape is not Shape.new):
                self._use_wal(conn)
            return found

        found = self._call("reading the file format", opening)
        refusal = self._store.refusal(found)
        if refusal is not None:
            raise refusal
        if found.missing and create:
            self._write("creating leaderrun's tables", self._create)

    def init(self) -> InitOutcome:
        """``leaderrun init``: create, upgrade or leave alone.

        An upgrade runs every step of :data:`STEPS` from the file's format in
        one transaction, and is logged.

        Raises:
            ConfigError: the file holds a table leaderrun did not create.
            DatabaseUnavailableError: a newer leaderrun's file, or it cannot be used.
        """
        found = self._call("reading the file format", _read_format)
        if found.shape is Shape.older:
            # The file is leaderrun's, so WAL mode is its own already.
            for note in self._write("upgrading the tables", self._upgrade):
                log.warning("upgraded %s to %s", self._store.path, note)
            return InitOutcome.upgraded
        refusal = self._store.refusal(found)
        if refusal is not None:
            raise refusal
        self._call("switching to WAL mode", self._use_wal)
        created = self._write("creating leaderrun's tables", self._create)
        return InitOutcome.created if created else InitOutcome.current

    def _create(self, conn: sqlite3.Connection, now: Instant) -> bool:
        """Create the tables a file lacks, under the lock; True if it had none.

        Decided again under the write lock: a racing first user may have
        created them, or an older leaderrun tables of its own.
        """
        found = _read_format(conn)
        refusal = self._store.refusal(found)
        if refusal is not None:
            raise refusal
        if TABLE in found.missing:
            conn.execute(_LEASE_DDL)
        if RUN_TABLE in found.missing:
            conn.execute(_RUN_DDL)
        _stamp(conn, FORMAT)
        created = found.shape is Shape.new
        if created:
            log.info("created leaderrun's tables in %s", self._store.path)
            if self._store.fs_type.lower() in VOLATILE_FS_TYPES:
                log.warning(
                    "sqlite://%s is on %s, which a reboot empties: the lock's fencing "
                    "tokens then start again at 1; put the file on a disk (e.g. "
                    "/var/lib/leaderrun) if a job's target keeps the tokens",
                    self._store.path,
                    self._store.fs_type,
                )
        return created

    def _upgrade(self, conn: sqlite3.Connection, now: Instant) -> list[str]:
        """Run every step from the file's format to this one, under the lock.

        Returns what each step did, for the log once it is committed.
        """
        found = _read_format(conn)
        if found.shape is not Shape.older:
            refusal = self._store.refusal(found)
            if refusal is not None:
                raise refusal
            self._create(conn, now)  # a racing init upgraded it already
            return []
        notes = []
        for step in STEPS[found.version or 0 :]:
            done = step.apply(conn, now)
            notes.append(f"file format {step.to_format} ({step.summary}): {done}")
        _stamp(conn, FORMAT)
        return notes

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode == "wal":
            return
        # Persistent in the file: only its first users pay for the switch.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise DatabaseUnavailableError(
                f"cannot put {self._store.path} in WAL mode (it stays in {mode!r}); "
                "is the file system local and writable?"
            )

    # --- the dialect -----------------------------------------------------------------

    def _query(
        self, name: str, params: Mapping[str, Any], lock: LockId | None
    ) -> list[Row]:
        what = _WHAT[name].format(lock=repr(str(lock)))
        unit = QUERIES[name]
        if name in _READS:
            return self._call(
                what,
                lambda conn: unit(conn, {**params, **_at(self._store.clock.now())}),
            )
        return self._write(what, lambda conn, now: unit(conn, {**params, **_at(now)}))

    def _to_datetime(self, value: Any) -> datetime:
        return datetime.fromtimestamp(value, UTC)

    def _create_missing(self) -> bool:
        self._write("creating leaderrun's tables", self._create)
        return True

    def _has_run_table(self) -> bool:
        return RUN_TABLE in self._call("reading the schema", _columns)

    def _transaction_left_open(self) -> str | None:
        conn = self._conn
        return "open" if conn is not None and conn.in_transaction else None

    def _interrupt(self) -> None:
        # Called by the waiting thread as it gives up: never blocks.
        self._giving_up.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def _stuck(self, what: str, bound_s: float) -> str:
        return (
            f"{what} in {self._store.path} did not finish within {bound_s:.3g}s "
            "and was given up; is the disk or its file system stuck?"
        )

    def _given_up(self, what: str) -> str:
        return (
            f"{what} in {self._store.path}: this connection was given up with a "
            "statement in flight; open a new one"
        )

    # --- bounded calls ---------------------------------------------------------------

    def _write(
        self, doing: str, body: Callable[[sqlite3.Connection, Instant], _T]
    ) -> _T:
        """Run ``body`` in one write transaction, with now read under the lock.

        ``BEGIN IMMEDIATE`` takes the write lock before anything is read, so the
        transaction is as atomic as PostgreSQL's one statement, and the clock,
        read after it, is never behind any earlier writer's. A transaction whose
        call was given up meanwhile is rolled back rather than committed: a
        lease nobody will use would otherwise block the lock until it ran out.
        """

        def unit(conn: sqlite3.Connection) -> _T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn, self._store.clock.now())
                if self._abandoned:
                    raise _GivenUp
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return result

        return self._call(doing, unit)

    def _call(self, what: str, unit: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``unit`` on a worker thread within ``bound_s``; retry it while busy.

        Raises:
            StatementTimeoutError: the write lock stayed taken for ``busy_s``, or
                the call ran past ``bound_s`` (then the session is dead).
            DatabaseUnavailableError: the session is dead, or SQLite failed.
            BaseException: what a signal handler raised in this thread (the call
                was given up: the session is dead).
        """
        try:
            return self._bounded(what, lambda: self._retry_busy(what, unit))
        except sqlite3.Error as exc:
            raise self._store.error(exc, what) from None

    def _retry_busy(self, doing: str, unit: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``unit``; while another connection holds the lock, try again.

        For at most ``busy_s``, and not once the caller gave the call up. The
        unit rolled back whatever it had begun, so a retry starts clean. The
        connection is opened here too: its first statement reads the schema,
        which waits for a process switching a new file to WAL.
        """
        give_up_s = boottime() + self._store.busy_s
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    self._conn = self._store.new_connection()
                conn = self._conn
                self._check_idle()
                result = unit(conn)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise
                left_s = give_up_s - boottime()
                if left_s <= 0:
                    raise self._store.busy(doing) from None
                pause_s = BUSY_PAUSES_S[min(attempt, len(BUSY_PAUSES_S) - 1)]
                attempt += 1
                if self._giving_up.wait(min(pause_s, left_s)):
                    raise _GivenUp from None
                continue
            self._check_idle()
            return result

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except Exception:
            log.debug("closing the SQLite connection failed", exc_info=True)


def _read_format(conn: sqlite3.Connection) -> FileFormat:
    """The file's :class:`FileFormat`, read from its header and schema."""
    application_id, user_version = conn.execute(_HEADER).fetchone()
    return file_format(application_id, user_version, _columns(conn))


def _columns(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """The columns of each of leaderrun's tables the file has."""
    tables: dict[str, list[str]] = {}
    for table, column in conn.execute(_TABLE_COLUMNS).fetchall():
        tables.setdefault(table, []).append(column)
    return tables


def _stamp(conn: sqlite3.Connection, version: int) -> None:
    """Mark the file as leaderrun's, of format ``version``, in this transaction."""
    # PRAGMA takes no parameters; both values are this module's integers.
    conn.execute(f"PRAGMA application_id = {int(APPLICATION_ID)}")
    conn.execute(f"PRAGMA user_version = {int(version)}")


def _fetch(
    conn: sqlite3.Connection, statement: str, params: Mapping[str, Any]
) -> list[Row]:
    """A statement's rows by column name; one empty row per row it changed if none."""
    # fetchall: an upsert with RETURNING is done only once it has been stepped
    # to the end; a half-read cursor would keep its statement open.
    cursor = conn.execute(statement, params)
    try:
        rows = cursor.fetchall()
        if cursor.description is None:
            return [{}] * max(cursor.rowcount, 0)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in rows]
    finally:
        cursor.close()


Unit = Callable[[sqlite3.Connection, Mapping[str, Any]], list[Row]]
"""One named query: statements on the connection, with the clock in the params."""


def _acquire(conn: sqlite3.Connection, params: Mapping[str, Any]) -> list[Row]:
    """Take the lock if free or expired; record the run; else describe the holder.

    The slot of a ``--once-per``/``--schedule`` run is of the wall clock:
    slots are calendar time, and this store's clock is the host's.
    """
    once_per = params["once_per"]
    window = None if once_per is None else once_per.slot_at(params["unix_s"]).start_s
    at = {**params, "window_start": window}
    keep = at["keep"]
    previous = _fetch(conn, _PREVIOUS, at) if keep is not None else []
    taken = _fetch(conn, _ACQUIRE, at)
    if not taken:
        return [{**row, "slot_known": True} for row in _fetch(conn, _HOLDER, at)]
    token = taken[0]["token"]
    if keep is not None:
        last = previous[0] if previous else {}
        run = {
            **at,
            "token": token,
            "prev_token": last.get("token"),
            "prev_renewed": last.get("renewed_unix_s"),
        }
        lost = conn.execute(_CLOSE_LOST, run).rowcount
        if lost:
            conn.execute(_COUNT_LOST, {**run, "lost": lost})
        for statement in (_START_RUN, _PRUNE):
            conn.execute(statement, run)
    return [
        {"acquired": True, "token": token, "window_start": window, "slot_known": True}
    ]


def _release(conn: sqlite3.Connection, params: Mapping[str, Any]) -> list[Row]:
    """Close the run (with an outcome), then end the lease if it is ours.

    The lease row counts the run once, by outcome, unless another node
    already closed it as lost (and counted it so); one never started is
    neither kept nor counted.
    """
    open_run = conn.execute(_RUN_OPEN, params).fetchone()
    once = (
        bool(params["started"])
        and params["outcome"] is not None
        and (open_run is None or bool(open_run[0]))
    )
    conn.execute(_FINISH_RUN, params)
    conn.execute(_DROP_RUN, params)
    return _fetch(conn, _RELEASE, {**params, "once": once})


def _leases(statement: str) -> Unit:
    """A query of lease rows, with the times ``status`` shows added to each."""

    def unit(conn: sqlite3.Connection, params: Mapping[str, Any]) -> list[Row]:
        now = Instant(params["boot_id"], params["boot_s"], params["unix_s"])
        return [
            row if row["lock_key"] is None else {**row, **_shown_times(row, now)}
            for row in _fetch(conn, statement, params)
        ]

    return unit


def _statement(statement: str) -> Unit:
    return lambda conn, params: _fetch(conn, statement, params)


QUERIES: Mapping[str, Unit] = {
    "acquire": _acquire,
    "renew": _statement(_RENEW),
    "release": _release,
    "snapshot": _leases(_SNAPSHOT),
    "operator_release": _leases(_OPERATOR_RELEASE),
    "history": _statement(_HISTORY),
    "last_runs": _statement(_LAST_RUNS),
    "run_output": _statement(_RUN_OUTPUT),
}
"""The SQLite twin of each query the shared SQL session names (``sql.QUERIES``)."""

_READS = frozenset({"snapshot", "history", "last_runs", "run_output"})
"""The queries that only read: no write transaction, no write lock."""

_WHAT: Mapping[str, str] = {
    "acquire": "acquiring {lock}",
    "renew": "renewing {lock}",
    "release": "releasing {lock}",
    "snapshot": "reading the leases",
    "operator_release": "releasing {lock}",
    "history": "reading the run history",
    "last_runs": "reading the run history",
    "run_output": "reading a run's output",
}
"""How messages name each query."""


def _at(now: Instant) -> dict[str, Any]:
    return {"boot_id": now.boot_id, "boot_s": now.boot_s, "unix_s": now.unix_s}


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether another connection's lock made the statement fail."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def expires_unix_s(
    boot_id: str | None, expires_boot_s: float, renewed_unix_s: float, now: Instant
) -> float:
    """When a lease ends, on the wall clock of ``now``, for people to read.

    A lease of this boot ends ``expires_boot_s - now.boot_s`` from now, exactly
    as the store decides it. One of another boot ended with that boot; its last
    renewal is the best the file knows of when, and never later than now.
    """
    if boot_id == now.boot_id:
        return now.unix_s + (expires_boot_s - now.boot_s)
    return min(renewed_unix_s, now.unix_s)


def _shown_times(row: Row, now: Instant) -> dict[str, float | None]:
    """A lease row's times as ``status`` shows them, in Unix seconds."""
    return {
        "last_ok_at": row["last_ok_unix_s"],
        "acquired_at": row["acquired_unix_s"],
        "renewed_at": row["renewed_unix_s"],
        "expires_at": expires_unix_s(
            row["boot_id"], row["expires_boot_s"], row["renewed_unix_s"], now
        ),
    }
