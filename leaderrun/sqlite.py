"""The SQLite lease store: leases in one file, for every process of one host.

The only module that imports ``sqlite3``. It keeps the PostgreSQL store's
semantics (``leaderrun.postgres``): the same ``leader_lease`` columns, one
statement to acquire (an upsert that takes the row only when it is free or
expired), a compare-and-swap on holder and token to renew and release, rows
never deleted, so the fencing token only grows.

Time comes from the host clock, read inside SQL (``julianday('now')``, fixed for
the whole of one statement), so every process on the host judges expiry by the
same clock, as with the database clock of PostgreSQL. Expiry is stored as Unix
seconds (REAL).

Locking: the file is in WAL mode, so readers never block the writer, and every
lease statement is a single autocommit write that takes SQLite's write lock
before it reads, so racing upserts are serialized and each sees the latest row.
A statement waits for the write lock at most ``busy_s`` (the renewal attempt
budget); the kill deadline never waits on it, since the main thread that keeps
it never touches the database. ``synchronous=FULL`` makes each commit durable
before it returns: a fencing token handed to a child must not be handed out
again after a power cut. WAL needs shared memory and POSIX locks that work, so
a file on a network file system is refused (:func:`network_fs_type`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from leaderrun.clock import boottime
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
)
from leaderrun.lease import Lease, LockId
from leaderrun.runs import OncePer, RunEnd, RunRecord, window_start_s
from leaderrun.store import (
    REVOKED_HOLDER,
    AcquireResult,
    Claim,
    LeaseRecord,
    LeaseSnapshot,
    OperatorQueries,
    ReleaseAction,
    ReleaseResult,
    key_collision,
    release_outcome,
)

log = logging.getLogger("leaderrun")

TABLE = "leader_lease"
"""The lease table's name, as in PostgreSQL."""

MAX_COMMAND_CHARS = 1000
"""The command shown in ``status`` is cut to this many characters."""

MIN_SQLITE_VERSION = (3, 35, 0)
"""RETURNING, which the acquire needs, came in SQLite 3.35."""

MIN_BUSY_S = 0.1
"""The shortest wait for SQLite's write lock (seconds), whatever the budget."""

NETWORK_FS_TYPES = frozenset(
    {
        "9p",
        "afs",
        "beegfs",
        "ceph",
        "cifs",
        "coda",
        "fuse.ceph-fuse",
        "fuse.davfs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.sshfs",
        "gfs2",
        "glusterfs",
        "gpfs",
        "lustre",
        "ncpfs",
        "nfs",
        "nfs4",
        "ocfs2",
        "orangefs",
        "smb3",
        "smbfs",
    }
)
"""File systems shared between hosts, where SQLite's locks or WAL index are unsafe.

SQLite's own documentation: POSIX advisory locks are broken on many network file
systems, and WAL keeps its index in shared memory, which only one host can see.
"""

WAL_SWITCH_RETRY_S = 0.01
"""Pause between attempts to open a file that another process is switching to WAL."""

MOUNTINFO = Path("/proc/self/mountinfo")
"""Where Linux lists the mounts this process sees."""

# Times are Unix seconds from the host clock, (julianday('now') - 2440587.5) *
# 86400. SQLite fixes 'now' for the whole of one sqlite3_step(), so every use in
# one statement sees the same instant. The SQL is spelled out in full (no string
# building): TABLE is its table.

_DDL = """
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

RUN_TABLE = "leader_run"
"""The run history table, as in PostgreSQL."""

_RUN_DDL = """
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

# One statement takes the lock when it is free or expired, bumping the token in
# the same row. The write lock is taken before the row is read, so of N racing
# contenders exactly one finds it free. The key-collision test mirrors
# PostgreSQL's IS NOT DISTINCT FROM.
_ACQUIRE = """
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

# Only when the acquire took nothing: who holds it, for the message and for how
# long a waiter sleeps. It decides nothing, so a second statement is harmless.
_HOLDER = """
SELECT holder, host, pid,
       expires_at - (julianday('now') - 2440587.5) * 86400.0, lock_name,
       coalesce(window_start = :window_start
                AND NOT (:retry_failed AND window_ok IS NOT 1), 0)
  FROM leader_lease WHERE lock_key = :key"""

# --- run history and --once-per: several statements in one write transaction.
# BEGIN IMMEDIATE takes the write lock first, so the transaction is as atomic
# as PostgreSQL's one statement; :now is the host clock read inside it.

_NOW = "SELECT (julianday('now') - 2440587.5) * 86400.0"

_PREVIOUS = "SELECT token, renewed_at FROM leader_lease WHERE lock_key = :key"

# Runs whose holder died are closed as lost, at their last renewal if known.
_CLOSE_LOST = """
UPDATE leader_run
   SET outcome = 'lost',
       finished_at = coalesce(
           CASE WHEN token = :prev_token THEN :prev_renewed END, :now)
 WHERE lock_key = :key AND finished_at IS NULL
   AND token < :token AND token > :token - :keep"""

_START_RUN = """
INSERT INTO leader_run
    (lock_key, lock_name, token, holder, host, pid, command, window_start,
     started_at)
VALUES (:key, :name, :token, :holder, :host, :pid, :command, :window_start, :now)
ON CONFLICT (lock_key, token) DO UPDATE
    SET lock_name = excluded.lock_name, holder = excluded.holder,
        host = excluded.host, pid = excluded.pid, command = excluded.command,
        window_start = excluded.window_start, started_at = excluded.started_at,
        finished_at = NULL, exit_status = NULL, outcome = NULL"""

_PRUNE = "DELETE FROM leader_run WHERE lock_key = :key AND token <= :token - :keep"

_FINISH_RUN = """
UPDATE leader_run
   SET finished_at = coalesce(finished_at, :now), exit_status = :exit_status,
       outcome = :outcome
 WHERE lock_key = :key AND token = :token AND holder = :holder
   AND (finished_at IS NULL OR outcome = 'lost')"""

# --min-hold: the same holder keeps the lease until acquired_at + min_hold.
_RELEASE_ENDED = """
UPDATE leader_lease
   SET holder = CASE WHEN acquired_at + :min_hold_s > :now THEN holder END,
       expires_at = max(:now, acquired_at + :min_hold_s),
       window_ok = coalesce(:window_ok, window_ok)
 WHERE lock_key = :key AND holder = :holder AND token = :token"""

# A run with no outcome is 'running' while its lease (same token) is live, and
# otherwise lost: its holder died and nobody has taken the lock since.
_RUN_COLUMNS = """
SELECT r.lock_key, r.lock_name, r.token, r.holder, r.host, r.pid, r.command,
       r.window_start, r.started_at, r.finished_at, r.exit_status,
       coalesce(r.outcome,
                CASE WHEN l.token = r.token AND l.holder IS NOT NULL
                          AND l.expires_at > (julianday('now') - 2440587.5) * 86400.0
                     THEN 'running' ELSE 'lost' END),
       coalesce(r.finished_at,
                CASE WHEN l.token = r.token
                     THEN min(l.renewed_at,
                              (julianday('now') - 2440587.5) * 86400.0) END,
                (julianday('now') - 2440587.5) * 86400.0) - r.started_at
  FROM leader_run r LEFT JOIN leader_lease l ON l.lock_key = r.lock_key"""

_HISTORY = (
    _RUN_COLUMNS
    + """
 WHERE :key IS NULL OR r.lock_key = :key
 ORDER BY r.started_at DESC, r.lock_key, r.token DESC
 LIMIT :limit"""
)

_LAST_RUNS = (
    _RUN_COLUMNS  # noqa: S608 - constant SQL, no value is formatted in
    + """
 WHERE r.token = (SELECT max(token) FROM leader_run m WHERE m.lock_key = r.lock_key)
 ORDER BY r.lock_key"""
)

# A compare-and-swap on (holder, token), as in PostgreSQL; and, as there, an
# expired lease is not revived by a renewal that comes too late to count.
_RENEW = """
UPDATE leader_lease
   SET expires_at = (julianday('now') - 2440587.5) * 86400.0 + :lease_s,
       renewed_at = (julianday('now') - 2440587.5) * 86400.0
 WHERE lock_key = :key AND holder = :holder AND token = :token
   AND expires_at > (julianday('now') - 2440587.5) * 86400.0"""

# Release keeps the row, and so the token, for the life of the file.
_RELEASE = """
UPDATE leader_lease
   SET holder = NULL, expires_at = (julianday('now') - 2440587.5) * 86400.0
 WHERE lock_key = :key AND holder = :holder AND token = :token"""


# status: every row (or one lock's) and the host's now, in one statement, so
# one read snapshot. The LEFT JOIN from a one-row relation returns now even
# when there is no row at all.
_SNAPSHOT = """
SELECT (julianday('now') - 2440587.5) * 86400.0, l.lock_key, l.lock_name,
       l.holder, l.token, l.acquired_at, l.renewed_at, l.expires_at, l.host,
       l.pid, l.command
  FROM (SELECT 1) AS one
  LEFT JOIN leader_lease AS l ON :key IS NULL OR l.lock_key = :key
 ORDER BY l.lock_name NULLS LAST, l.lock_key"""

# release, as in PostgreSQL: one conditional UPDATE decides. An expired lease
# is cleared; with force, a live one is revoked (a holder no renewal matches,
# expires_at kept, so nobody takes it before the old holder had to stop its
# child). The token is never touched. RETURNING gives the row as updated.
_OPERATOR_RELEASE = """
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

_TABLE_EXISTS = """
SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'leader_lease'"""


def setup_sql() -> str:
    """The SQL that ``leaderrun init`` runs on a SQLite file (``--print-sql``)."""
    return (
        "-- leaderrun leader_lease in a SQLite file; times are Unix seconds.\n"
        "-- leaderrun also sets PRAGMA journal_mode = WAL (kept in the file) and\n"
        "-- synchronous = FULL (on each connection). Never delete rows: the\n"
        "-- fencing token must keep increasing.\n"
        "PRAGMA journal_mode = WAL;\n" + _DDL.strip() + ";\n"
    )


def _unescape_mount_field(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` is a space)."""
    out, index = [], 0
    while index < len(field):
        chunk = field[index : index + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def mount_fs_type(directory: str, mountinfo: str) -> str | None:
    """The file system type of the mount holding ``directory`` (absolute, resolved).

    ``mountinfo`` is the text of ``/proc/self/mountinfo``. The mount whose mount
    point is the longest path prefix of ``directory`` holds it; of two mounts on
    the same point, the later one (listed last) is on top. None if no line fits.
    """
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = _unescape_mount_field(fields[4])
        fs_type = line.split(" - ", 1)[1].split(" ")[0]
        inside = (
            mount_point == "/"
            or directory == mount_point
            or directory.startswith(mount_point.rstrip("/") + "/")
        )
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


def network_fs_type(directory: Path) -> str | None:
    """The network file system ``directory`` is on, or None if it is local.

    None also when the mounts cannot be read (not Linux, no /proc): the check
    is an aid, and SQLite works on a local disk without it.
    """
    try:
        mountinfo = MOUNTINFO.read_text()
    except OSError:
        return None
    fs_type = mount_fs_type(str(directory.resolve()), mountinfo)
    if fs_type is not None and fs_type.lower() in NETWORK_FS_TYPES:
        return fs_type
    return None


class SqliteLeaseStore(OperatorQueries):
    """Leases in the ``leader_lease`` table of one SQLite file, for one host.

    Args:
        path: the database file (absolute); created with the table on first use.
        busy_s: how long a statement waits for another process's write lock;
            the renewal attempt budget, so a wait never outlasts an attempt.
        create: create the table on first use if it is missing.

    Raises:
        ConfigError: the directory does not exist, or is on a network file system.
        DatabaseUnavailableError: this Python's SQLite is too old.
    """

    def __init__(self, path: Path, *, busy_s: float = 5.0, create: bool = True) -> None:
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
        # Resolve the file, not only its directory: a symlink may lead elsewhere.
        real_directory = path.resolve().parent
        fs_type = network_fs_type(real_directory)
        if fs_type is not None:
            raise ConfigError(
                f"sqlite://{path}: {str(real_directory)!r} is on a network file "
                f"system ({fs_type}), where SQLite's locking is unsafe; put the file "
                "on a local disk, or use a PostgreSQL DSN to share a lock between "
                "hosts"
            )

    def describe(self) -> str:
        """The database file's path."""
        return f"sqlite://{self.path}"

    def connect(self) -> SqliteSession:
        """Open an autocommit session on the file, in WAL mode, synchronous=FULL.

        Raises:
            DatabaseUnavailableError: the file cannot be opened or used.
        """
        give_up_s = boottime() + self.busy_s
        while True:
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(
                    self._target,
                    uri=True,
                    timeout=self.busy_s,
                    isolation_level=None,  # autocommit: each statement commits alone
                    check_same_thread=False,  # one thread at a time, not always one
                )
                conn.execute("PRAGMA synchronous = FULL")
                self._use_wal(conn)
                return SqliteSession(self, conn)
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                # Switching a new file to WAL needs an exclusive lock taken from a
                # shared one; SQLite answers BUSY at once rather than risk a
                # deadlock, without waiting. So wait here, as long as it would.
                if _is_busy(exc) and boottime() < give_up_s:
                    time.sleep(WAL_SWITCH_RETRY_S)
                    continue
                raise self._error(exc, "cannot open") from None
            except BaseException:
                if conn is not None:
                    conn.close()
                raise

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if mode == "wal":
            return
        # Persistent in the file: only its first users pay for the switch.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise DatabaseUnavailableError(
                f"cannot put {self.path} in WAL mode (it stays in {mode!r}); "
                "is the file system local and writable?"
            )

    def init(self) -> bool:
        """Create the file and the lease table if missing; True if it was created.

        Raises:
            DatabaseUnavailableError: the file cannot be opened or written.
        """
        session = self.connect()
        try:
            if session.table_exists():
                return False
            session.ensure_table()
            return True
        finally:
            session.close()

    def _missing(self) -> SchemaMissingError:
        return SchemaMissingError(
            f"{self.path} has no {TABLE} table; run `leaderrun init --dsn "
            f"sqlite://{self.path}` (or any leaderrun run with it) first"
        )

    def _error(self, exc: sqlite3.Error, doing: str) -> DatabaseUnavailableError:
        """The leaderrun error for a sqlite3 error, naming the file and what to do."""
        name = getattr(exc, "sqlite_errorname", "")
        text = str(exc) or type(exc).__name__
        if _is_busy(exc):
            return DatabaseUnavailableError(
                f"{doing} {self.path}: another process held its write lock for "
                f"more than {self.busy_s:.3g}s"
            )
        cant_open = name.startswith("SQLITE_CANTOPEN")
        if cant_open and not self.create and not self.path.exists():
            return self._missing()
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return DatabaseUnavailableError(
                f"{doing} {self.path}: {text}; the file, its directory and its -wal "
                "and -shm files must be writable by every user of the lock"
            )
        if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return DatabaseUnavailableError(
                f"{doing} {self.path}: {text}; is it a leaderrun SQLite database?"
            )
        return DatabaseUnavailableError(f"{doing} {self.path}: {text}")


class SqliteSession:
    """One connection to the file, used by one thread at a time."""

    def __init__(self, store: SqliteLeaseStore, conn: sqlite3.Connection) -> None:
        self._store = store
        self._conn = conn
        self._in_transaction = False

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

        Plain, one autocommit statement. With ``once_per`` (refuse when the
        host clock's current window already ran) or ``history_keep`` (record
        the run, close runs of dead holders as lost, prune), one write
        transaction: the write lock is taken before anything is read.

        Raises:
            ConfigError: the lock's key is taken by a lock of another name.
            SchemaMissingError: no table, and ``create`` is off.
            DatabaseUnavailableError: the statement could not run.
        """
        try:
            return self._acquire(lock, claim, lease_s, once_per, history_keep)
        except SchemaMissingError:
            if not self._store.create:
                raise
            self.ensure_table()
            return self._acquire(lock, claim, lease_s, once_per, history_keep)

    def _acquire(
        self,
        lock: LockId,
        claim: Claim,
        lease_s: float,
        once_per: OncePer | None,
        history_keep: int | None,
    ) -> AcquireResult:
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
        if once_per is None and history_keep is None:
            return self._decide(lock, claim, params, self._rows(_ACQUIRE, params))
        with self._transaction():
            now_s = self._rows(_NOW, {})[0][0]
            if once_per is not None:
                params["window_start"] = window_start_s(
                    now_s, once_per.period_s, once_per.offset_s
                )
            previous = self._rows(_PREVIOUS, {"key": lock.key})
            rows = self._rows(_ACQUIRE, params)
            if rows and history_keep is not None:
                prev_token, prev_renewed = previous[0] if previous else (None, None)
                run = {
                    **params,
                    "token": rows[0][0],
                    "keep": history_keep,
                    "now": now_s,
                    "prev_token": prev_token,
                    "prev_renewed": prev_renewed,
                }
                for statement in (_CLOSE_LOST, _START_RUN, _PRUNE):
                    self._count(statement, run)
            return self._decide(lock, claim, params, rows)

    def _decide(
        self,
        lock: LockId,
        claim: Claim,
        params: dict[str, Any],
        rows: list[Any],
    ) -> AcquireResult:
        window = params["window_start"]
        window_start = None if window is None else _utc(window)
        if rows:
            return AcquireResult(
                lease=Lease(lock, claim.holder, int(rows[0][0])),
                window_start=window_start,
            )
        held = self._rows(
            _HOLDER,
            {
                "key": lock.key,
                "window_start": window,
                "retry_failed": params["retry_failed"],
            },
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
        """Extend our lease by ``lease_s`` from the host's now; False if lost."""
        return self._count(_RENEW, {**_lease_params(lease), "lease_s": lease_s}) == 1

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row; False if it was no longer ours.

        With ``end``, also close the run in the history (even when the lease is
        no longer ours), hold the lease until ``acquired_at + end.min_hold_s``,
        and record for ``--retry-failed`` whether a window's run ended well.
        """
        if end is None:
            return self._count(_RELEASE, _lease_params(lease)) == 1
        params: dict[str, Any] = {
            **_lease_params(lease),
            "outcome": str(end.outcome),
            "exit_status": end.exit_status,
            "min_hold_s": end.min_hold_s,
            "window_ok": end.window_ok,
        }
        with self._transaction():
            params["now"] = self._rows(_NOW, {})[0][0]
            self._count(_FINISH_RUN, params)
            return self._count(_RELEASE_ENDED, params) == 1

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, of one lock or of all, newest first."""
        key = None if lock is None else lock.key
        return self._runs(_HISTORY, {"key": key, "limit": limit})

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        return self._runs(_LAST_RUNS, {})

    def _runs(self, statement: str, params: dict[str, Any]) -> list[RunRecord]:
        try:
            rows = self._rows(statement, params)
        except SchemaMissingError:
            return []  # nothing was ever recorded here
        return [_run_record(row) for row in rows]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: the write lock first, then all or nothing."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._map(exc) from None
        self._in_transaction = True
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._map(exc) from None
            raise
        finally:
            self._in_transaction = False
        self._check_idle()

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Rows of the lease table (all, or ``lock``'s) with the host's now."""
        key = None if lock is None else lock.key
        rows = self._rows(_SNAPSHOT, {"key": key})
        records = tuple(_record(row[1:]) for row in rows if row[1] is not None)
        return LeaseSnapshot(db_now=_utc(rows[0][0]), records=records)

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

        def update() -> ReleaseResult | None:
            rows = self._rows(_OPERATOR_RELEASE, params)
            if not rows:
                return None
            record = _record(rows[0][1:])
            action = (
                ReleaseAction.freed if record.holder is None else ReleaseAction.revoked
            )
            return ReleaseResult(action, record, _utc(rows[0][0]))

        return release_outcome(lock, token, update, lambda: self.snapshot(lock))

    def table_exists(self) -> bool:
        """Whether the file has the lease table."""
        return bool(self._rows(_TABLE_EXISTS, {})[0][0])

    def ensure_table(self) -> None:
        """``CREATE TABLE IF NOT EXISTS`` the lease table.

        Raises:
            DatabaseUnavailableError: the file cannot be written.
        """
        try:
            self._conn.execute(_DDL)
            self._conn.execute(_RUN_DDL)
        except sqlite3.Error as exc:
            raise self._store._error(exc, f"cannot create {TABLE} in") from None
        log.debug("table %s is ready in %s", TABLE, self._store.path)

    def close(self) -> None:
        """Close the connection; never raises."""
        try:
            self._conn.close()
        except Exception:
            log.debug("closing the SQLite connection failed", exc_info=True)

    def _rows(self, statement: str, params: dict[str, Any]) -> list[Any]:
        # fetchall: an upsert with RETURNING commits only once it has been
        # stepped to the end; a half-read cursor would keep the write lock.
        try:
            cursor = self._conn.execute(statement, params)
            try:
                rows = cursor.fetchall()
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise self._map(exc) from None
        self._check_idle()
        return rows

    def _count(self, statement: str, params: dict[str, Any]) -> int:
        try:
            count = self._conn.execute(statement, params).rowcount
        except sqlite3.Error as exc:
            raise self._map(exc) from None
        self._check_idle()
        return count

    def _check_idle(self) -> None:
        # A statement left inside a transaction would keep the write lock and
        # hide our write from everyone else: fail loudly, never silently.
        if self._conn.in_transaction and not self._in_transaction:
            raise LeaderrunError(f"SQLite connection to {self._store.path} left open")

    def _map(self, exc: sqlite3.Error) -> DatabaseUnavailableError:
        if "no such table" in str(exc):
            return self._store._missing()
        return self._store._error(exc, "statement failed on")


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether another connection's lock made the statement fail."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def _maybe_utc(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else _utc(unix_s)


def _run_record(row: tuple[Any, ...]) -> RunRecord:
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


def _record(row: tuple[Any, ...]) -> LeaseRecord:
    key, name, holder, token, acquired, renewed, expires, host, pid, command = row
    return LeaseRecord(
        key=key,
        name=name,
        holder=holder,
        token=token,
        acquired_at=_utc(acquired),
        renewed_at=_utc(renewed),
        expires_at=_utc(expires),
        host=host,
        pid=pid,
        command=command,
    )


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"key": lease.lock.key, "holder": lease.holder, "token": lease.token}
