"""The SQLite lease store: leases in one file, for every process of one host.

The only module that imports ``sqlite3``. It keeps the PostgreSQL store's
semantics (``leaderrun.stores.postgres``): one ``leader_lease`` row per lock, taken by
an upsert only when it is free or expired, renewed and released by a
compare-and-swap on holder and token, and never deleted, so the fencing token
only grows.

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

from leaderrun.bounded import CallTimedOut, call_bounded
from leaderrun.clock import boottime
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
    StatementTimeoutError,
)
from leaderrun.lease import Lease, LockId
from leaderrun.runs import OncePer, RunEnd, RunRecord, window_start_s
from leaderrun.stores.base import (
    REVOKED_HOLDER,
    AcquireResult,
    Claim,
    InitOutcome,
    LeaseRecord,
    LeaseSnapshot,
    OperatorQueries,
    ReleaseAction,
    ReleaseResult,
    key_collision,
    release_outcome,
)
from leaderrun.stores.host import (
    VOLATILE_FS_TYPES,
    HostClock,
    Instant,
    fs_refusal,
    mount_fs_type,
    read_mountinfo,
)

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")

TABLE = "leader_lease"
"""The lease table's name, as in PostgreSQL."""

RUN_TABLE = "leader_run"
"""The run history table, as in PostgreSQL."""

MAX_COMMAND_CHARS = 1000
"""The command shown in ``status`` is cut to this many characters."""

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
    window_ok       INTEGER
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
    PRIMARY KEY (lock_key, token)
)"""


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


_LEASE_COLUMNS_0 = _names(
    "lock_key lock_name holder token acquired_at renewed_at expires_at host pid command"
)
_WINDOW_COLUMNS = _names("window_start window_ok")
_LEASE_COLUMNS_1 = _names(
    "lock_key lock_name holder token boot_id acquired_boot_s expires_boot_s "
    "acquired_unix_s renewed_unix_s host pid command window_start window_ok"
)
_RUN_COLUMNS = _names(
    "lock_key lock_name token holder host pid command window_start started_at "
    "finished_at exit_status outcome"
)

SHAPES: Mapping[int, Mapping[str, tuple[frozenset[str], ...]]] = {
    # Before formats had numbers: Unix seconds from julianday('now'). The first
    # release had neither the --once-per columns nor the history table.
    0: {
        TABLE: (_LEASE_COLUMNS_0, _LEASE_COLUMNS_0 | _WINDOW_COLUMNS),
        RUN_TABLE: (_RUN_COLUMNS,),
    },
    1: {TABLE: (_LEASE_COLUMNS_1,), RUN_TABLE: (_RUN_COLUMNS,)},
}
"""The column sets of leaderrun's own tables in each format: how a file of an
older leaderrun that predates ``user_version`` is told from a stranger's."""


@dataclass(frozen=True)
class Step:
    """One upgrade of the file format, run by ``leaderrun init``.

    ``apply`` runs inside the write transaction that also stamps the new format,
    with the clock read under the lock; it returns a note for the log.
    """

    to_format: int
    summary: str
    apply: Callable[[sqlite3.Connection, Instant], str]


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


STEPS: tuple[Step, ...] = (
    Step(1, "lease times on CLOCK_BOOTTIME, not the wall clock", _to_boot_clock),
)
"""Every upgrade, in order; ``STEPS[n]`` upgrades format ``n`` to ``n + 1``."""

FORMAT = STEPS[-1].to_format
"""The file format this leaderrun reads and writes (``PRAGMA user_version``)."""


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
     acquired_unix_s, renewed_unix_s, host, pid, command, window_start, window_ok)
VALUES (:key, :name, :holder, 1, :boot_id, :boot_s, :boot_s + :lease_s,
        :unix_s, :unix_s, :host, :pid, :command, :window_start, NULL)
ON CONFLICT (lock_key) DO UPDATE
    SET lock_name = excluded.lock_name, holder = excluded.holder,
        token = l.token + 1, boot_id = excluded.boot_id,
        acquired_boot_s = excluded.acquired_boot_s,
        expires_boot_s = excluded.expires_boot_s,
        acquired_unix_s = excluded.acquired_unix_s,
        renewed_unix_s = excluded.renewed_unix_s,
        host = excluded.host, pid = excluded.pid, command = excluded.command,
        window_start = coalesce(excluded.window_start, l.window_start),
        window_ok = CASE WHEN excluded.window_start IS NULL THEN l.window_ok END
    WHERE (l.holder IS NULL OR l.boot_id IS NOT :boot_id
           OR l.expires_boot_s <= :boot_s)
      AND l.lock_name IS excluded.lock_name
      AND NOT coalesce(l.window_start = excluded.window_start
                       AND NOT (:retry_failed AND l.window_ok IS NOT 1), 0)
RETURNING token"""

# Only when the acquire took nothing, in the same transaction: who holds it, for
# the message and for how long a waiter sleeps.
_HOLDER = """
SELECT holder, host, pid,
       CASE WHEN boot_id IS :boot_id THEN expires_boot_s - :boot_s ELSE 0.0 END,
       lock_name,
       coalesce(window_start = :window_start
                AND NOT (:retry_failed AND window_ok IS NOT 1), 0)
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

_FINISH_RUN = """
UPDATE leader_run
   SET finished_at = coalesce(finished_at, :unix_s), exit_status = :exit_status,
       outcome = :outcome
 WHERE lock_key = :key AND token = :token AND holder = :holder
   AND (finished_at IS NULL OR outcome = 'lost')"""

# A compare-and-swap on (holder, token), as in PostgreSQL; and, as there, an
# expired lease is not revived by a renewal that comes too late to count.
_RENEW = """
UPDATE leader_lease
   SET expires_boot_s = :boot_s + :lease_s, renewed_unix_s = :unix_s
 WHERE lock_key = :key AND holder = :holder AND token = :token
   AND boot_id IS :boot_id AND expires_boot_s > :boot_s"""

# Release keeps the row, and so the token, for the life of the file.
_RELEASE = """
UPDATE leader_lease
   SET holder = NULL, expires_boot_s = :boot_s
 WHERE lock_key = :key AND holder = :holder AND token = :token"""

# --min-hold: the same holder keeps the lease until acquired + min_hold.
_RELEASE_ENDED = """
UPDATE leader_lease
   SET holder = CASE WHEN acquired_boot_s + :min_hold_s > :boot_s THEN holder END,
       expires_boot_s = max(:boot_s, acquired_boot_s + :min_hold_s),
       window_ok = coalesce(:window_ok, window_ok)
 WHERE lock_key = :key AND holder = :holder AND token = :token"""

# A run with no outcome is 'running' while its lease (same token) is live, and
# otherwise lost: its holder died and nobody has taken the lock since.
_RUN_SELECT = """
SELECT r.lock_key, r.lock_name, r.token, r.holder, r.host, r.pid, r.command,
       r.window_start, r.started_at, r.finished_at, r.exit_status,
       coalesce(r.outcome,
                CASE WHEN l.token = r.token AND l.holder IS NOT NULL
                          AND l.boot_id IS :boot_id AND l.expires_boot_s > :boot_s
                     THEN 'running' ELSE 'lost' END),
       coalesce(r.finished_at,
                CASE WHEN l.token = r.token THEN min(l.renewed_unix_s, :unix_s) END,
                :unix_s) - r.started_at
  FROM leader_run r LEFT JOIN leader_lease l ON l.lock_key = r.lock_key"""

_HISTORY = (
    _RUN_SELECT
    + """
 WHERE :key IS NULL OR r.lock_key = :key
 ORDER BY r.started_at DESC, r.lock_key, r.token DESC
 LIMIT :limit"""
)

_LAST_RUNS = (
    _RUN_SELECT  # noqa: S608 - constant SQL, no value is formatted in
    + """
 WHERE r.token = (SELECT max(token) FROM leader_run m WHERE m.lock_key = r.lock_key)
 ORDER BY r.lock_key"""
)

_RECORD_COLUMNS = """lock_key, lock_name, holder, token, boot_id, expires_boot_s,
       acquired_unix_s, renewed_unix_s, host, pid, command"""

_SNAPSHOT = (
    "SELECT "  # noqa: S608 - constant SQL, no value is formatted in
    + _RECORD_COLUMNS
    + """
  FROM leader_lease WHERE :key IS NULL OR lock_key = :key
 ORDER BY lock_name NULLS LAST, lock_key"""
)

# release, as in PostgreSQL: one conditional UPDATE decides. An expired lease
# is cleared; with force, a live one is revoked (a holder no renewal matches,
# its expiry kept, so nobody takes it before the old holder had to stop its
# child). The token is never touched. RETURNING gives the row as updated.
_OPERATOR_RELEASE = (
    """
UPDATE leader_lease
   SET holder = CASE
           WHEN boot_id IS NOT :boot_id OR expires_boot_s <= :boot_s THEN NULL
           ELSE :revoked END
 WHERE lock_key = :key AND holder IS NOT NULL
   AND (:token IS NULL OR token = :token)
   AND (boot_id IS NOT :boot_id OR expires_boot_s <= :boot_s
        OR (:force AND holder <> :revoked))
RETURNING """
    + _RECORD_COLUMNS
)

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


class SqliteLeaseStore(OperatorQueries):
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
    ) -> None:
        self.path = path
        self.busy_s = max(MIN_BUSY_S, busy_s)
        self.create = create
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

    @property
    def bound_s(self) -> float:
        """The longest a call may take before the caller gives it up, in seconds."""
        return self.busy_s + STATEMENT_ALLOWANCE_S

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

    def connect(self) -> SqliteSession:
        """Open a session on the file, after checking that it is leaderrun's.

        In WAL mode and synchronous=FULL; with ``create``, a file without
        leaderrun's tables gets them (never altering a table that is there).

        Raises:
            SchemaMissingError: the file was written by an older leaderrun (run
                ``leaderrun init``), or it is missing and ``create`` is off.
            ConfigError: a ``leader_lease`` or ``leader_run`` table that is not
                leaderrun's, or another application's file.
            DatabaseUnavailableError: a newer leaderrun's file, or the file
                cannot be opened or used.
            StatementTimeoutError: another process kept the file locked.
        """
        session = SqliteSession(self)
        try:
            session.prepare()
        except BaseException:
            session.close()
            raise
        return session

    def init(self) -> InitOutcome:
        """Create the file's tables, or upgrade an older leaderrun's.

        An upgrade runs every step of :data:`STEPS` from the file's format in
        one transaction, and is logged.

        Raises:
            ConfigError: the file holds a table leaderrun did not create.
            DatabaseUnavailableError: a newer leaderrun's file, or it cannot be used.
        """
        session = SqliteSession(self)
        try:
            return session.init()
        finally:
            session.close()

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


class SqliteSession:
    """One connection to the file, used by one thread at a time.

    Every method is one call on a worker thread, bounded by the store's
    ``bound_s`` (:func:`leaderrun.bounded.call_bounded`). A call that was given
    up (the bound passed, or a signal handler raised in the waiting thread)
    leaves the session dead: every later call raises
    :class:`~leaderrun.errors.DatabaseUnavailableError`, and the caller opens a
    new session. The connection is closed by whoever touches it last.
    """

    def __init__(self, store: SqliteLeaseStore) -> None:
        self._store = store
        self._conn: sqlite3.Connection | None = None
        self._abandoned = False

    # --- the calls -------------------------------------------------------------------

    def acquire(
        self,
        lock: LockId,
        claim: Claim,
        lease_s: float,
        *,
        once_per: OncePer | None = None,
        history_keep: int | None = None,
    ) -> AcquireResult:
        """Take the lock if free or expired; else describe its holder.

        One write transaction. With ``once_per``, refuse when the current window
        (of the wall clock: windows are calendar time) already ran; with
        ``history_keep``, record the run, close runs of dead holders as lost,
        and prune.

        Raises:
            ConfigError: the lock's key is taken by a lock of another name.
            SchemaMissingError: no table, and ``create`` is off.
            StatementTimeoutError: another process kept the write lock.
            DatabaseUnavailableError: the statement could not run.
        """
        params: dict[str, Any] = {
            "key": lock.key,
            "name": lock.name,
            "holder": claim.holder,
            "lease_s": lease_s,
            "host": claim.host,
            "pid": claim.pid,
            "command": claim.command[:MAX_COMMAND_CHARS],
            "window_start": None,
            "retry_failed": once_per is not None and once_per.retry_failed,
        }

        def body(conn: sqlite3.Connection, now: Instant) -> tuple[list[Any], ...]:
            params.update(_at(now))
            if once_per is not None:
                params["window_start"] = window_start_s(
                    now.unix_s, once_per.period_s, once_per.offset_s
                )
            previous = (
                _fetch(conn, _PREVIOUS, params) if history_keep is not None else []
            )
            taken = _fetch(conn, _ACQUIRE, params)
            if taken and history_keep is not None:
                prev_token, prev_renewed = previous[0] if previous else (None, None)
                run = {
                    **params,
                    "token": taken[0][0],
                    "keep": history_keep,
                    "prev_token": prev_token,
                    "prev_renewed": prev_renewed,
                }
                for statement in (_CLOSE_LOST, _START_RUN, _PRUNE):
                    conn.execute(statement, run)
            held = [] if taken else _fetch(conn, _HOLDER, params)
            return taken, held

        taken, held = self._write(f"acquiring {str(lock)!r}", body)
        window = params["window_start"]
        window_start = None if window is None else _utc(window)
        if taken:
            return AcquireResult(
                lease=Lease(lock, claim.holder, int(taken[0][0])),
                window_start=window_start,
            )
        if not held:
            return AcquireResult(lease=None, window_start=window_start)
        holder, host, pid, expires_in_s, name, done = held[0]
        if name != lock.name:
            raise key_collision(lock, name)
        return AcquireResult(
            lease=None,
            holder=holder,
            holder_host=host,
            holder_pid=pid,
            expires_in_s=expires_in_s,
            window_start=window_start,
            window_done=bool(done),
        )

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease by ``lease_s`` from now on the boot clock; False if lost."""
        params = {**_lease_params(lease), "lease_s": lease_s}

        def body(conn: sqlite3.Connection, now: Instant) -> int:
            return conn.execute(_RENEW, {**params, **_at(now)}).rowcount

        return self._write(f"renewing {str(lease.lock)!r}", body) == 1

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row; False if it was no longer ours.

        With ``end``, also close the run in the history (even when the lease is
        no longer ours), hold the lease until ``acquired + end.min_hold_s``, and
        record for ``--retry-failed`` whether a window's run ended well.
        """
        params: dict[str, Any] = _lease_params(lease)
        if end is not None:
            params |= {
                "outcome": str(end.outcome),
                "exit_status": end.exit_status,
                "min_hold_s": end.min_hold_s,
                "window_ok": end.window_ok,
            }

        def body(conn: sqlite3.Connection, now: Instant) -> int:
            at = {**params, **_at(now)}
            if end is None:
                return conn.execute(_RELEASE, at).rowcount
            conn.execute(_FINISH_RUN, at)
            return conn.execute(_RELEASE_ENDED, at).rowcount

        return self._write(f"releasing {str(lease.lock)!r}", body) == 1

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, of one lock or of all, newest first."""
        key = None if lock is None else lock.key
        return self._runs(_HISTORY, {"key": key, "limit": limit})

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        return self._runs(_LAST_RUNS, {})

    def _runs(self, statement: str, params: dict[str, Any]) -> list[RunRecord]:
        def unit(conn: sqlite3.Connection) -> list[Any]:
            return _fetch(conn, statement, {**params, **_at(self._store.clock.now())})

        try:
            rows = self._call("reading the run history", unit)
        except SchemaMissingError:
            return []  # nothing was ever recorded here
        return [_run_record(row) for row in rows]

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Rows of the lease table (all, or ``lock``'s) with the host's now."""
        key = None if lock is None else lock.key

        def unit(conn: sqlite3.Connection) -> tuple[Instant, list[Any]]:
            return self._store.clock.now(), _fetch(conn, _SNAPSHOT, {"key": key})

        now, rows = self._call("reading the leases", unit)
        return LeaseSnapshot(
            db_now=_utc(now.unix_s), records=tuple(_record(row, now) for row in rows)
        )

    def operator_release(
        self, lock: LockId, *, force: bool, token: int | None = None
    ) -> ReleaseResult:
        """One conditional UPDATE; when it changes nothing, say why from a snapshot."""
        params = {
            "key": lock.key,
            "force": force,
            "revoked": REVOKED_HOLDER,
            "token": token,
        }

        def body(conn: sqlite3.Connection, now: Instant) -> tuple[Instant, list[Any]]:
            return now, _fetch(conn, _OPERATOR_RELEASE, {**params, **_at(now)})

        def update() -> ReleaseResult | None:
            now, rows = self._write(f"releasing {str(lock)!r}", body)
            if not rows:
                return None
            record = _record(rows[0], now)
            action = (
                ReleaseAction.freed if record.holder is None else ReleaseAction.revoked
            )
            return ReleaseResult(action, record, _utc(now.unix_s))

        return release_outcome(lock, token, update, lambda: self.snapshot(lock))

    def table_exists(self) -> bool:
        """Whether the file has the lease table."""
        return TABLE in self._call("reading the schema", _columns)

    def close(self) -> None:
        """Close the connection; never raises.

        A connection whose call was given up is left to the worker, which closes
        it once the statement returns: never from under a running statement.
        """
        if not self._abandoned:
            self._close_connection()

    # --- the file's format ---------------------------------------------------------

    def prepare(self) -> None:
        """Check the file is this version's, switch it to WAL, create missing tables.

        Nothing is changed in a file that is not leaderrun's or not of this
        format; with ``create`` off, nothing is created either.
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
        """``leaderrun init``: create, upgrade or leave alone."""
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

    def _call(self, doing: str, unit: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``unit`` on a worker thread within ``bound_s``; retry it while busy.

        Raises:
            StatementTimeoutError: the write lock stayed taken for ``busy_s``, or
                the call ran past ``bound_s`` (then the session is dead).
            DatabaseUnavailableError: the session is dead, or SQLite failed.
            BaseException: what a signal handler raised in this thread (the call
                was given up: the session is dead).
        """
        store = self._store
        if self._abandoned:
            raise DatabaseUnavailableError(
                f"{doing} in {store.path}: this connection was given up with a "
                "statement in flight; open a new one"
            )
        given_up = threading.Event()

        def work() -> _T:
            return self._retry_busy(doing, unit, given_up)

        def interrupt() -> None:
            # Called by the waiting thread as it gives up: never blocks.
            self._abandoned = True
            given_up.set()
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.interrupt()

        def cleanup() -> None:
            self._abandoned = True
            self._close_connection()

        try:
            return call_bounded(
                work,
                store.bound_s,
                interrupt=interrupt,
                cleanup=cleanup,
                name="leaderrun-sqlite",
            )
        except CallTimedOut as exc:
            raise StatementTimeoutError(
                f"{doing} in {store.path} did not finish within {exc.bound_s:.3g}s "
                "and was given up; is the disk or its file system stuck?"
            ) from None
        except sqlite3.Error as exc:
            raise store.error(exc, doing) from None

    def _retry_busy(
        self,
        doing: str,
        unit: Callable[[sqlite3.Connection], _T],
        given_up: threading.Event,
    ) -> _T:
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
                self._check_idle(conn)
                result = unit(conn)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise
                left_s = give_up_s - boottime()
                if left_s <= 0:
                    raise self._store.busy(doing) from None
                pause_s = BUSY_PAUSES_S[min(attempt, len(BUSY_PAUSES_S) - 1)]
                attempt += 1
                if given_up.wait(min(pause_s, left_s)):
                    raise _GivenUp from None
                continue
            self._check_idle(conn)
            return result

    def _check_idle(self, conn: sqlite3.Connection) -> None:
        # A statement left inside a transaction would keep the write lock and
        # hide our write from everyone else: fail loudly, never silently.
        if conn.in_transaction:
            raise LeaderrunError(f"SQLite connection to {self._store.path} left open")

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
) -> list[Any]:
    # fetchall: an upsert with RETURNING is done only once it has been stepped
    # to the end; a half-read cursor would keep its statement open.
    cursor = conn.execute(statement, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _at(now: Instant) -> dict[str, Any]:
    return {"boot_id": now.boot_id, "boot_s": now.boot_s, "unix_s": now.unix_s}


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether another connection's lock made the statement fail."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def _maybe_utc(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else _utc(unix_s)


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


def _record(row: Sequence[Any], now: Instant) -> LeaseRecord:
    key, name, holder, token, boot_id, expires_boot_s = row[:6]
    acquired_unix_s, renewed_unix_s, host, pid, command = row[6:]
    return LeaseRecord(
        key=key,
        name=name,
        holder=holder,
        token=token,
        acquired_at=_utc(acquired_unix_s),
        renewed_at=_utc(renewed_unix_s),
        expires_at=_utc(expires_unix_s(boot_id, expires_boot_s, renewed_unix_s, now)),
        host=host,
        pid=pid,
        command=command,
    )


def _run_record(row: Sequence[Any]) -> RunRecord:
    key, name, token, holder, host, pid, command, window, started = row[:9]
    finished, exit_status, outcome, duration_s = row[9:]
    return RunRecord(
        lock_key=key,
        lock_name=name,
        token=token,
        holder=holder,
        host=host,
        pid=pid,
        command=command,
        window_start=_maybe_utc(window),
        started_at=_utc(started),
        finished_at=_maybe_utc(finished),
        exit_status=exit_status,
        outcome=outcome,
        duration_s=float(duration_s),
    )


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"key": lease.lock.key, "holder": lease.holder, "token": lease.token}
