"""The PostgreSQL lease store: all of leaderrun's SQL, and the only psycopg user.

Every lease statement is a single autocommit statement whose times come from the
server's ``now()`` (safety rules ``database-clock``, ``one-statement`` and
``no-session-state``, docs/safety.md). Connections carry no session
state: no SET, no advisory locks, no prepared statements, so they work through
PgBouncer in transaction mode. Schema and table are always quoted identifiers,
and every value is a bound parameter.

Every statement is bounded (``bounded-statements``): it runs on a worker thread
(:func:`leaderrun.bounded.call_bounded`) for at most the store's statement
bound, and one given up is cancelled on the server, so that it neither waits on
there nor commits later. ``statement_timeout`` cannot do this: it needs a SET or
a startup option, which PgBouncer in transaction mode does not carry, and no
server-side timer helps against a frozen server anyway.

leaderrun alters only its own tables (``own-tables-only``): it tells them by their
core columns, refuses anything else in their place, and upgrades its own only
in ``init``, never on the hot path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, LiteralString, TypeVar

import psycopg
from psycopg import errors as e
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.pq import TransactionStatus

from leaderrun.bounded import CallTimedOut, call_bounded
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    ForeignTableError,
    LeaderrunError,
    SchemaMissingError,
    StatementTimeoutError,
)
from leaderrun.handoff import ListenRefusedError
from leaderrun.lease import Lease, LockId
from leaderrun.redact import dsn_secrets, redact
from leaderrun.runs import OncePer, RunEnd, RunOutcome, RunRecord
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

log = logging.getLogger("leaderrun")

TABLE = "leader_lease"
"""The lease table's name (the seed's)."""

RUN_TABLE = "leader_run"
"""The run history table's name."""

MAX_COMMAND_CHARS = 1000
"""The command shown in ``status`` is cut to this many characters."""

DEFAULT_CONNECT_TIMEOUT_S = 5
"""libpq connect_timeout in seconds (psycopg: 2 at least), unless the DSN sets it."""

CANCEL_TIMEOUT_S = 1.0
"""How long a cancel request may wait for the server to take it (at most).

A live server answers in milliseconds; one that has not in a second is frozen,
and the cancel will not help. The process waits for it before exiting (so that
a command line that gives up still cancels its statement), so keep it short.
"""

INIT_LOCK_TIMEOUT_S = 0.5
"""How long ``init``'s ALTER TABLE may wait for its lock, per try.

While it waits, its queued ACCESS EXCLUSIVE request holds up every later
statement on the table, renewals included: keep that far below any renewal's
attempt budget.
"""

INIT_LOCK_TRIES = 5
"""How many times ``init`` tries to lock a table it upgrades before giving up."""

INIT_RETRY_PAUSE_S = 0.5
"""The pause between two of ``init``'s tries, in which the queued statements run."""

_T = TypeVar("_T")

UNSAFE_SYNCHRONOUS_COMMIT = frozenset({"off"})
"""``synchronous_commit`` values under which an acknowledged lease may vanish.

With ``off`` a crash loses the last commits the server already acknowledged:
an acquire (so its fencing token is handed out twice) or a renewal (so another
node takes the lock while this one still runs). ``local`` is crash-safe on one
server; what it means with standbys is in the README ("Production").
"""

# {create} is CREATE TABLE IF NOT EXISTS in the SQL printed for a DBA (safe to
# repeat), and a plain CREATE TABLE when leaderrun runs it, in one transaction
# with the comment: a table that exists already, leaderrun's or not, is left
# as it is, comment included.
_DDL: LiteralString = """
{create} {table} (
    lock_key     bigint      PRIMARY KEY,
    lock_name    text,
    holder       text,
    token        bigint      NOT NULL,
    acquired_at  timestamptz NOT NULL,
    renewed_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    host         text,
    pid          integer,
    command      text,
    window_start timestamptz,
    window_ok    boolean
)"""

_COMMENT: LiteralString = """
COMMENT ON TABLE {table} IS
'leaderrun leases. Never delete rows: the fencing token must keep increasing.'"""

# The start of the --once-per window containing {at}: the SQL twin of
# leaderrun.runs.window_start_s, NULL without --once-per (period_s NULL).
_WINDOW: LiteralString = """to_timestamp(
    floor((extract(epoch FROM {at})::float8 - %(offset_s)s::float8)
          / %(period_s)s::float8)
    * %(period_s)s::float8 + %(offset_s)s::float8)"""

# One statement: take the lock when it is free (holder NULL) or expired in the
# server's time, bumping the token in the same row; otherwise report the holder.
# In READ COMMITTED the ON CONFLICT path locks the row and re-checks the WHERE on
# its latest version, so of N racing contenders exactly one wins. The second
# branch reads the pre-statement snapshot: good enough to know how long to sleep.
#
# With --once-per (period_s not NULL), the window of the server's now() is
# computed here too, and a row whose window_start is that window refuses in the
# same WHERE (unless retry_failed and the window's run did not end ok), so no
# client clock decides whether a window ran. With history (keep not NULL), the
# same statement records the run, closes runs whose holder died as 'lost' (their
# last renewal is the last sign of life, read from the pre-statement snapshot),
# and prunes the lock's history to the newest `keep` tokens.
_ACQUIRE: LiteralString = """
WITH w AS (
    SELECT {window} AS window_start
), prev AS (
    SELECT token, renewed_at FROM {table} WHERE lock_key = %(key)s
), attempt AS (
    INSERT INTO {table} AS l
        (lock_key, lock_name, holder, token, acquired_at, renewed_at, expires_at,
         host, pid, command, window_start, window_ok)
    VALUES (%(key)s, %(name)s, %(holder)s, 1, now(), now(),
            now() + make_interval(secs => %(lease_s)s), %(host)s, %(pid)s, %(command)s,
            (SELECT window_start FROM w), NULL)
    ON CONFLICT (lock_key) DO UPDATE
        SET lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder,
            token = l.token + 1, acquired_at = now(), renewed_at = now(),
            expires_at = EXCLUDED.expires_at, host = EXCLUDED.host,
            pid = EXCLUDED.pid, command = EXCLUDED.command,
            window_start = coalesce(EXCLUDED.window_start, l.window_start),
            window_ok = CASE WHEN EXCLUDED.window_start IS NULL THEN l.window_ok END
        WHERE (l.holder IS NULL OR l.expires_at <= now())
          AND l.lock_name IS NOT DISTINCT FROM EXCLUDED.lock_name
          AND NOT coalesce(
                l.window_start = EXCLUDED.window_start
                AND NOT (%(retry_failed)s AND l.window_ok IS NOT TRUE), false)
    RETURNING l.token
), lost AS (
    UPDATE {runs} AS r
       SET outcome = 'lost',
           finished_at = coalesce(
               (SELECT p.renewed_at FROM prev p WHERE p.token = r.token), now())
     WHERE %(keep)s::integer IS NOT NULL
       AND r.lock_key = %(key)s AND r.finished_at IS NULL
       AND r.token < (SELECT token FROM attempt)
       AND r.token > (SELECT token FROM attempt) - %(keep)s::integer
), started AS (
    INSERT INTO {runs} AS r
        (lock_key, lock_name, token, holder, host, pid, command, window_start,
         started_at)
    SELECT %(key)s, %(name)s, a.token, %(holder)s, %(host)s, %(pid)s, %(command)s,
           w.window_start, now()
      FROM attempt a, w
     WHERE %(keep)s::integer IS NOT NULL
    -- Only if the lease table was emptied by hand and tokens restarted.
    ON CONFLICT (lock_key, token) DO UPDATE
        SET lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder,
            host = EXCLUDED.host, pid = EXCLUDED.pid, command = EXCLUDED.command,
            window_start = EXCLUDED.window_start, started_at = EXCLUDED.started_at,
            finished_at = NULL, exit_status = NULL, outcome = NULL
), pruned AS (
    DELETE FROM {runs} AS r
     WHERE r.lock_key = %(key)s
       AND r.token <= (SELECT token FROM attempt) - %(keep)s::integer
)
SELECT true, a.token, NULL::text, NULL::text, NULL::integer, NULL::float8,
       %(name)s, w.window_start, false
  FROM attempt a, w
UNION ALL
SELECT false, l.token, l.holder, l.host, l.pid,
       extract(epoch FROM l.expires_at - now())::float8, l.lock_name, w.window_start,
       coalesce(l.window_start = w.window_start
                AND NOT (%(retry_failed)s AND l.window_ok IS NOT TRUE), false)
  FROM {table} l, w
 WHERE l.lock_key = %(key)s AND NOT EXISTS (SELECT FROM attempt)"""

# A compare-and-swap on (holder, token): every takeover bumps the token, so a
# match proves nobody acquired in between, and a stale renewal matches nothing.
# An expired lease is not renewed either: a renewal held up (a frozen server, a
# row lock) until after expiry comes too late for its holder, which has stopped
# its child; reviving the row would only keep every contender out for one more
# lease.
_RENEW: LiteralString = """
UPDATE {table}
   SET expires_at = now() + make_interval(secs => %(lease_s)s), renewed_at = now()
 WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
   AND expires_at > now()"""

# Release keeps the row, and so the token, for the life of the table. With a
# run's end it also closes the run (overriding a 'lost' that another node guessed:
# the holder knows better how it ended, though a release that comes late, after a
# partition, keeps the guessed finish, the last renewal, rather than its own
# now()) and, for --min-hold, keeps the lease taken by the same
# holder until acquired_at + min_hold in the server's time, so a late node finds
# it held without the holder staying alive. window_ok records, for
# --retry-failed, whether the window's run ended well. Still one statement, it
# also wakes the lock's waiters (leaderrun.handoff) when the lock is really free
# now: the notification goes out at commit, and only if the lease was ours.
_RELEASE: LiteralString = """
WITH finished AS (
    UPDATE {runs}
       SET finished_at = coalesce(finished_at, now()),
           exit_status = %(exit_status)s::integer,
           outcome = %(outcome)s::text
     WHERE %(outcome)s::text IS NOT NULL
       AND lock_key = %(key)s AND token = %(token)s AND holder = %(holder)s
       AND (finished_at IS NULL OR outcome = 'lost')
), released AS (
    UPDATE {table}
       SET holder = CASE
               WHEN acquired_at + make_interval(secs => %(min_hold_s)s) > now()
               THEN holder END,
           expires_at = greatest(now(),
                                 acquired_at + make_interval(secs => %(min_hold_s)s)),
           window_ok = coalesce(%(window_ok)s::boolean, window_ok)
     WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
    RETURNING holder
)
SELECT (SELECT pg_notify(%(channel)s, '') WHERE r.holder IS NULL) FROM released r"""

_LISTEN: LiteralString = "LISTEN {channel}"

MAX_CHANNEL_BYTES = 63
"""NAMEDATALEN - 1: PostgreSQL refuses longer channel names in pg_notify()."""


def release_channel(schema: str, key: int) -> str:
    """The NOTIFY channel on which releases of the lock ``key`` are announced.

    The schema is part of it, since each schema has its own table. A schema so
    long that the name is cut can only make two locks share a channel, which
    costs their waiters a spurious wake-up, never a wrong acquire.
    """
    channel = f"leaderrun:{key}" if schema == "public" else f"leaderrun:{key}:{schema}"
    return channel.encode()[:MAX_CHANNEL_BYTES].decode(errors="ignore")


# The columns --once-per needs, added by init to a lease table made by an older
# version (a new one has them from the start).
_LEASE_COLUMNS: LiteralString = """
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS window_start timestamptz,
    ADD COLUMN IF NOT EXISTS window_ok    boolean"""

_RUN_DDL: LiteralString = """
{create} {runs} (
    lock_key     bigint      NOT NULL,
    lock_name    text,
    token        bigint      NOT NULL,
    holder       text        NOT NULL,
    host         text,
    pid          integer,
    command      text,
    window_start timestamptz,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    exit_status  integer,
    outcome      text CHECK (outcome IN ('ok', 'failed', 'killed', 'timeout', 'lost')),
    PRIMARY KEY (lock_key, token)
)"""

_RUN_COMMENT: LiteralString = """
COMMENT ON TABLE {runs} IS
'leaderrun run history: one row per run, pruned per lock by leaderrun itself.'"""

# A run with no outcome is 'running' while its lease (same token) is live, and
# otherwise lost: its holder died and nobody has taken the lock since.
_RUN_COLUMNS: LiteralString = """
SELECT r.lock_key, r.lock_name, r.token, r.holder, r.host, r.pid, r.command,
       r.window_start, r.started_at, r.finished_at, r.exit_status,
       coalesce(r.outcome,
                CASE WHEN l.token = r.token AND l.holder IS NOT NULL
                          AND l.expires_at > now()
                     THEN 'running' ELSE 'lost' END),
       extract(epoch FROM coalesce(
           r.finished_at,
           CASE WHEN l.token = r.token THEN least(l.renewed_at, now()) END,
           now()) - r.started_at)::float8
  FROM {runs} r LEFT JOIN {table} l ON l.lock_key = r.lock_key"""

_HISTORY: LiteralString = (
    _RUN_COLUMNS
    + """
 WHERE %(key)s::bigint IS NULL OR r.lock_key = %(key)s::bigint
 ORDER BY r.started_at DESC, r.lock_key, r.token DESC
 LIMIT %(limit)s"""
)

_LAST_RUNS: LiteralString = (
    """
SELECT DISTINCT ON (lock_key) * FROM ("""
    + _RUN_COLUMNS
    + """
) AS runs
 ORDER BY lock_key, token DESC"""
)


_SCHEMA: tuple[LiteralString, ...] = (
    _DDL,
    _COMMENT,
    _LEASE_COLUMNS,
    _RUN_DDL,
    _RUN_COMMENT,
)
"""Every DDL statement a DBA runs, in order; each is idempotent."""

_CREATE: Mapping[str, tuple[LiteralString, LiteralString]] = {
    TABLE: (_DDL, _COMMENT),
    RUN_TABLE: (_RUN_DDL, _RUN_COMMENT),
}
"""How leaderrun creates each of its tables: the table, then its comment."""

_UPGRADE: Mapping[str, LiteralString] = {TABLE: _LEASE_COLUMNS}
"""What ``init`` runs on a table of an older version (and only ``init``)."""

TABLE_COLUMNS: Mapping[str, tuple[str, ...]] = {
    TABLE: (
        *("lock_key", "lock_name", "holder", "token", "acquired_at", "renewed_at"),
        *("expires_at", "host", "pid", "command", "window_start", "window_ok"),
    ),
    RUN_TABLE: (
        *("lock_key", "lock_name", "token", "holder", "host", "pid", "command"),
        *("window_start", "started_at", "finished_at", "exit_status", "outcome"),
    ),
}
"""Every column of leaderrun's tables as this version makes them (the DDL's)."""

OWN_TABLE_COLUMNS: Mapping[str, frozenset[str]] = {
    TABLE: frozenset({"lock_key", "holder", "token", "expires_at"}),
    RUN_TABLE: frozenset({"lock_key", "token", "holder", "started_at", "outcome"}),
}
"""The core columns that make a table leaderrun's, in every version so far.

A table lacking any of them is another program's (the seed library's
``leader_lease`` has ``id, leader_id, expires_at, created_at``) and is never
touched. Not the comment: a table made by hand from the printed SQL may lack it.
"""

# Everything under leaderrun's table names in one schema: read from the catalog,
# so it works without privileges on the tables (or even USAGE on the schema), and
# waits for no lock on them.
_INSPECT: LiteralString = """
SELECT c.relname::text, c.relkind::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = ANY(%(names)s::text[])"""

_SYNCHRONOUS_COMMIT: LiteralString = "SELECT current_setting('synchronous_commit')"

# Transaction-scoped (set_config's is_local), so nothing outlives init's
# transaction, through PgBouncer in transaction mode too.
_LOCK_TIMEOUT: LiteralString = "SELECT set_config('lock_timeout', %(timeout)s, true)"

_RELATION_KINDS = {
    "r": "a table",
    "p": "a partitioned table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
}

Found = Mapping[str, tuple[str, tuple[str, ...]]]
"""What the catalog holds under leaderrun's table names: name -> (kind, columns)."""


def foreign_table(schema: str, found: Found) -> ForeignTableError | None:
    """The refusal of the first relation under leaderrun's names that is not its.

    A relation is leaderrun's if it is a table with every core column
    (:data:`OWN_TABLE_COLUMNS`); the error names what was found instead.
    """
    for name, core in OWN_TABLE_COLUMNS.items():
        if name not in found:
            continue
        kind, columns = found[name]
        if kind in ("r", "p") and core <= set(columns):
            continue
        what = _RELATION_KINDS.get(kind, "a relation")
        listed = ", ".join(columns) or "none"
        return ForeignTableError(
            f"{schema}.{name} is not leaderrun's table ({what} with columns "
            f"{listed}); leaderrun never alters a table it did not create: pass "
            "--schema to keep leaderrun's tables in a schema of their own"
        )
    return None


def missing_columns(found: Found) -> dict[str, list[str]]:
    """The columns each of leaderrun's tables found lacks: made by an older version."""
    lacking = {}
    for name, (_, columns) in found.items():
        if missing := [c for c in TABLE_COLUMNS[name] if c not in columns]:
            lacking[name] = missing
    return lacking


def outdated_table(schema: str, name: str, missing: list[str]) -> SchemaMissingError:
    """The hot path's refusal of an own table that only ``init`` may upgrade."""
    return SchemaMissingError(
        f"{schema}.{name} was made by an older leaderrun and lacks the columns "
        f"{', '.join(missing)}; run `leaderrun init --schema {schema}` to upgrade "
        "it, as a role that may alter it (or have a DBA run the SQL that "
        f"`leaderrun init --schema {schema} --print-sql` prints)"
    )


ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]
"""Opens a new psycopg connection; given to a store instead of a DSN."""

# --- the operators' statements: status, release, and the SQL a DBA runs ---

# One statement, so every row and now() come from one snapshot. The LEFT JOIN
# from a one-row relation returns now() even when there is no row at all.
_SNAPSHOT: LiteralString = """
SELECT now(), l.lock_key, l.lock_name, l.holder, l.token, l.acquired_at,
       l.renewed_at, l.expires_at, l.host, l.pid, l.command
  FROM (SELECT) AS one
  LEFT JOIN {table} AS l ON %(key)s::bigint IS NULL OR l.lock_key = %(key)s
 ORDER BY l.lock_name NULLS LAST, l.lock_key"""

# One conditional UPDATE decides, so an operator can never free a lease that
# was renewed or taken a moment ago: in READ COMMITTED a row changed under us
# is re-checked on its newest version. An expired lease is cleared (holder NULL,
# so the lock shows as free). With force, a live lease is revoked: the holder
# becomes a marker no holder can match, so the holder's next renewal (a
# compare-and-swap on holder and token) fails and it stops its child; its
# expires_at is kept, so nobody takes the lock before the old holder has had to
# stop its child by its own deadline. The token is never touched: the next
# acquirer gets token + 1.
_OPERATOR_RELEASE: LiteralString = """
UPDATE {table} AS l
   SET holder = CASE WHEN l.expires_at <= now() THEN NULL ELSE %(revoked)s END
 WHERE l.lock_key = %(key)s AND l.holder IS NOT NULL
   AND (%(token)s::bigint IS NULL OR l.token = %(token)s)
   AND (l.expires_at <= now() OR (%(force)s AND l.holder <> %(revoked)s))
RETURNING now(), l.lock_key, l.lock_name, l.holder, l.token, l.acquired_at,
          l.renewed_at, l.expires_at, l.host, l.pid, l.command"""

OPERATOR_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")
"""What a role that runs, shows and releases leases needs on the table.

INSERT ... ON CONFLICT DO UPDATE needs INSERT and UPDATE; reading the row
needs SELECT. No DELETE: rows are never deleted, and a role that could delete
one could restart a lock's fencing tokens at 1.
"""

RUN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
"""What the same role needs on the run history: the acquire statement prunes it."""

DEFAULT_GRANT_ROLE = "leaderrun"
"""The role ``init --print-sql`` grants to unless ``--role`` names another."""


def setup_sql(schema: str, role: str = DEFAULT_GRANT_ROLE) -> str:
    """The SQL a DBA runs once: the table, its comment, and a least-privileged role.

    The role gets USAGE on the schema and SELECT, INSERT, UPDATE on the lease
    table: it can run, show and release leases, but not create or drop the
    table, nor delete leases. On the run history it also gets DELETE, which
    the acquire statement needs to prune it. Needs no connection: identifiers
    are quoted here.
    """
    table = sql.Identifier(schema, TABLE)
    grantee = sql.Identifier(role)
    privileges = sql.SQL(", ").join(sql.SQL(p) for p in OPERATOR_PRIVILEGES)
    runs = sql.Identifier(schema, RUN_TABLE)
    run_privileges = sql.SQL(", ").join(sql.SQL(p) for p in RUN_PRIVILEGES)
    statements = [
        *(
            sql.SQL(ddl.strip()).format(
                table=table, runs=runs, create=sql.SQL("CREATE TABLE IF NOT EXISTS")
            )
            for ddl in _SCHEMA
        ),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(schema), grantee
        ),
        sql.SQL("GRANT {} ON {} TO {}").format(privileges, table, grantee),
        sql.SQL("GRANT {} ON {} TO {}").format(run_privileges, runs, grantee),
    ]
    text = [statement.as_string() + ";" for statement in statements]
    ddl_count = len(_SCHEMA)
    return (
        f"-- leaderrun {schema}.{TABLE} and {schema}.{RUN_TABLE}: run once as a "
        f"role that may create tables in {schema}; safe to repeat.\n"
        + "\n".join(text[:ddl_count])
        + f"\n-- The role {role} may run, show and release leases, but not create "
        "the table or delete rows\n-- (a deleted row would restart the lock's "
        "fencing tokens). It prunes its run history itself.\n"
        + "\n".join(text[ddl_count:])
        + "\n"
    )


def missing_table_hint(schema: str, role: str | None) -> str:
    """What to run when the lease table is missing and this role cannot create it."""
    role_flag = f" --role {role}" if role else ""
    return (
        f"run `leaderrun init --schema {schema}` as a role that may create tables "
        f"in {schema}, or have a DBA run the SQL that `leaderrun init --schema "
        f"{schema} --print-sql{role_flag}` prints"
    )


def _statement(template: LiteralString, schema: str) -> sql.Composed:
    return sql.SQL(template).format(
        table=sql.Identifier(schema, TABLE),
        runs=sql.Identifier(schema, RUN_TABLE),
        window=window_sql(sql.SQL("now()")),
        create=sql.SQL("CREATE TABLE"),
    )


def window_sql(at: sql.Composable) -> sql.Composed:
    """The SQL expression of the ``--once-per`` window containing ``at``.

    Takes the parameters ``period_s`` and ``offset_s``; the acquire statement
    uses it with ``now()``, and tests with other instants.
    """
    return sql.SQL(_WINDOW).format(at=at)


class _Wire:
    """A connection, and the means to stop a statement on it from another thread.

    libpq allows one way to cancel a statement from another thread: with a
    cancel object made beforehand by the thread that owns the connection. It is
    made here, as the connection opens, with a duplicate of its socket, so that
    stopping a statement never touches the connection itself (psycopg's
    ``close()`` from under a thread using it could crash the process).

    Args:
        conn: an open connection; its thread is the caller's.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.abandoned = False
        """A statement on it was given up: the connection is, or will be, closed."""
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = False
        # libpq 17's PQcancelCreate() sends an encrypted cancel without blocking;
        # an older libpq has only PQcancel(), which blocks its (own) thread.
        self._cancel_conn: pq.abc.PGcancelConn | None = None
        self._cancel: pq.abc.PGcancel | None = None
        try:
            if psycopg.capabilities.has_cancel_safe():
                self._cancel_conn = conn.pgconn.cancel_conn()
            else:
                self._cancel = conn.pgconn.get_cancel()
        except psycopg.Error:  # no cancel key (a proxy): ending the socket must do
            log.debug("this connection cannot send a cancel request", exc_info=True)
        # A duplicate, so that a socket number libpq closed and the kernel handed
        # to someone else is never shut down by mistake.
        self._fd = os.dup(conn.fileno())

    def interrupt(self, timeout_s: float) -> None:
        """Cancel the running statement on the server, then end the socket.

        Never blocks: a thread of its own sends the cancel request (waiting at
        most ``timeout_s`` for the server to take it), then shuts the socket
        down, so that the statement's thread, if still reading, gets EOF. In
        that order: behind PgBouncer, a client that is gone can no longer
        cancel, and the statement would run on, and commit, once unblocked.
        The thread is not a daemon, so the process exits only once the cancel
        is sent (a command line exits right after giving up): at most
        ``timeout_s`` later. Only an old libpq's cancel, which has no timeout,
        is not waited for.
        """
        with self._lock:
            if self._closed or self._stopping:
                return
            self._stopping = True
        try:
            threading.Thread(
                target=self._stop,
                args=(timeout_s,),
                name="leaderrun-cancel",
                daemon=self._cancel_conn is None,
            ).start()
        except RuntimeError:  # no thread to be had: at least free the reader
            log.debug("cannot start a thread to cancel the statement", exc_info=True)
            self._release_canceller()
            self._shutdown()

    def _stop(self, timeout_s: float) -> None:
        try:
            if self._cancel_conn is not None:
                _send_cancel(self._cancel_conn, timeout_s)
            elif self._cancel is not None:
                self._cancel.cancel()
        except Exception:  # the server may be frozen, the network gone
            log.debug("the cancel request failed", exc_info=True)
        finally:
            self._release_canceller()
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            sock = socket.socket(fileno=self._fd)
            try:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()  # the descriptor stays ours, closed by close()

    def _release_canceller(self) -> None:
        if self._cancel_conn is not None:
            self._cancel_conn.finish()
        if self._cancel is not None:
            self._cancel.free()

    def close(self) -> None:
        """Close the connection; never raises.

        Only on a thread that no statement of this connection is running on:
        the caller's, or the worker of a statement that was given up.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stopping = self._stopping
        try:
            self.conn.close()
        except Exception:
            log.debug("closing the connection failed", exc_info=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if not stopping:  # else the cancelling thread frees it, once done
            self._release_canceller()


def _send_cancel(cancel_conn: pq.abc.PGcancelConn, timeout_s: float) -> None:
    """Send a cancel request and wait until the server has taken it.

    Raises:
        TimeoutError: no answer within ``timeout_s`` (a frozen server).
        psycopg.OperationalError: the request failed.
    """
    cancel_conn.start()
    deadline_s = time.monotonic() + timeout_s
    while (status := cancel_conn.poll()) not in (
        pq.PollingStatus.OK,
        pq.PollingStatus.FAILED,
    ):
        remaining_s = deadline_s - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError(f"no answer to the cancel within {timeout_s:.3g}s")
        fd = cancel_conn.socket
        if status == pq.PollingStatus.READING:
            select.select([fd], [], [], remaining_s)
        else:
            select.select([], [fd], [], remaining_s)
    if status == pq.PollingStatus.FAILED:
        raise psycopg.OperationalError(cancel_conn.get_error_message())


class _Outcome(Generic[_T]):
    """A call's result or error, carried out of its worker thread as a value.

    So that an error of the statement itself (the connection still usable) is
    told apart from one raised while the caller waited (the call given up).
    """

    def __init__(self, work: Callable[[], _T]) -> None:
        self._value: _T | None = None
        self._error: BaseException | None = None
        try:
            self._value = work()
        except BaseException as exc:
            self._error = exc

    def get(self) -> _T:
        """The result, or the error raised again."""
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set when no error


class PostgresLeaseStore(OperatorQueries):
    """Leases in ``<schema>.leader_lease`` of one PostgreSQL database.

    Args:
        dsn: a libpq connection string or URI; empty means libpq's environment.
        schema: the schema of the lease table.
        attempt_budget_s: how long one attempt may take; bounds every statement
            (:attr:`statement_bound_s`) and sets the TCP timeouts so a dead peer
            frees a blocked socket read in about that time.
        create: create the table on first use if it is missing.
        connection_factory: opens each connection instead of ``dsn`` (which then
            only names the server in messages). Every connection it returns is
            switched to autocommit without prepared statements (``no-session-state``).
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        *,
        attempt_budget_s: float = 5.0,
        create: bool = True,
        connection_factory: ConnectionFactory | None = None,
    ) -> None:
        self.schema = schema
        self._factory = connection_factory
        self.create = create
        self.statement_bound_s = attempt_budget_s
        """How long any statement may take before it is given up and cancelled."""
        # (lock key, holder) -> the last token that holder was granted and told.
        self._answered_tokens: dict[tuple[int, str], int] = {}
        self._secrets = dsn_secrets(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"invalid DSN: {self._clean(exc)}; use key=value pairs or a "
                "postgresql:// URI"
            ) from None
        self._params: dict[str, Any] = params
        defaults: dict[str, Any] = {
            "connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
            "application_name": "leaderrun",
            # Liveness aids only: they free a socket read blocked on a vanished
            # peer so the renewal can reconnect. Safety never depends on them.
            "keepalives": 1,
            "keepalives_idle": max(1, int(attempt_budget_s)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": max(1000, int(attempt_budget_s * 1000)),
        }
        hosts = str(params.get("host") or params.get("hostaddr") or "").split(",")
        if len(hosts) > 1:
            # Only a primary can hold a lease; libpq skips the others.
            defaults["target_session_attrs"] = "read-write"
        extra = {k: v for k, v in defaults.items() if k not in params}
        self._conninfo = make_conninfo(dsn, **extra)
        # psycopg gives each host its connect_timeout; the caller waits for all
        # of them, and a statement's worth more for what a timeout does not
        # cover (a name lookup libpq makes blocking, a factory's pool).
        per_host_s = timeout_from_conninfo(conninfo_to_dict(self._conninfo))
        self.connect_bound_s = len(hosts) * per_host_s + attempt_budget_s
        """How long opening a connection may take before it is given up."""
        self._acquire = _statement(_ACQUIRE, schema)
        self._renew = _statement(_RENEW, schema)
        self._release = _statement(_RELEASE, schema)
        self._snapshot = _statement(_SNAPSHOT, schema)
        self._operator_release = _statement(_OPERATOR_RELEASE, schema)

    def describe(self) -> str:
        """``user@host:port/dbname`` as far as the DSN says; never a password."""
        p = self._params
        if self._factory is not None and not p:
            return "the connection factory's database"
        where = p.get("host") or p.get("hostaddr") or "(libpq default host)"
        port = f":{p['port']}" if p.get("port") else ""
        user = f"{p['user']}@" if p.get("user") else ""
        db = f"/{p['dbname']}" if p.get("dbname") else ""
        return f"{user}{where}{port}{db}"

    def connect(self) -> PostgresSession:
        """Open an autocommit session without prepared statements.

        Raises:
            DatabaseUnavailableError: the server cannot be reached or refused us.
        """
        session = PostgresSession(self, self._open(""))
        try:
            session.check_settings()
        except BaseException:
            session.close()
            raise
        conn = session._conn
        log.debug(
            "connected to %s (backend pid %s, server %s)",
            self.describe(),
            conn.info.backend_pid,
            conn.info.server_version,
        )
        # Behind PgBouncer in transaction mode a waiter's LISTEN can stick to a
        # pooled server connection that later serves us; psycopg would keep
        # every notification it then receives in a backlog that nobody reads.
        conn.add_notify_handler(_ignore_notification)
        return session

    def listen(self, lock: LockId) -> PostgresListener:
        """Open a new connection that listens for releases of ``lock``.

        It is never a lease connection: LISTEN is session state (``no-session-state``).

        Raises:
            ListenRefusedError: the server refused LISTEN.
            DatabaseUnavailableError: the connection could not be made.
        """
        channel = release_channel(self.schema, lock.key)
        wire = self._open(" to listen")
        listen = sql.SQL(_LISTEN).format(channel=sql.Identifier(channel))
        try:
            self.bounded(
                wire,
                f"LISTEN for lock {str(lock)!r}",
                lambda: wire.conn.execute(listen),
            )
        except psycopg.Error as exc:
            wire.close()
            raise ListenRefusedError(f"LISTEN refused: {self._clean(exc)}") from None
        except BaseException:
            if not wire.abandoned:
                wire.close()
            raise
        return PostgresListener(wire, channel, self._clean)

    def bounded(self, wire: _Wire, what: str, work: Callable[[], _T]) -> _T:
        """Run ``work``, statements on ``wire``, within :attr:`statement_bound_s`.

        ``what`` names the statement in the error ("acquire of lock 'x'"). The
        caller's thread only waits (a signal handler may raise there); given
        up, the statement is cancelled on the server, the connection closes
        once it returned, and ``wire`` is marked abandoned. ``work``'s own
        errors are raised as they are.

        Raises:
            StatementTimeoutError: the bound passed first.
            DatabaseUnavailableError: ``wire`` was abandoned before.
        """
        if wire.abandoned:
            raise DatabaseUnavailableError(
                f"the connection to {self.describe()} was given up after a "
                "statement that did not finish; open a new session"
            )
        bound_s = self.statement_bound_s
        cancel_s = min(bound_s, CANCEL_TIMEOUT_S)
        try:
            outcome = call_bounded(
                lambda: _Outcome(work),
                bound_s,
                interrupt=lambda: wire.interrupt(cancel_s),
                cleanup=wire.close,
            )
        except CallTimedOut:
            wire.abandoned = True
            raise StatementTimeoutError(self._stuck(what)) from None
        except BaseException:
            # Raised while waiting (a signal's handler): given up just the same.
            wire.abandoned = True
            raise
        return outcome.get()

    def answered(self, lock: LockId, holder: str, token: int) -> None:
        """Record that ``holder`` was granted ``lock`` with ``token``, and knows it."""
        self._answered_tokens[lock.key, holder] = token

    def unanswered(self, lock: LockId, holder: str, row: tuple[Any, ...]) -> bool:
        """Whether an acquire's refusal shows a grant to ``holder`` it never saw.

        Holder identities are unique per process start, and every grant takes a
        larger token: a lease held by ``holder`` with a token above the last one
        it was answered comes from an acquire whose answer was lost. Nobody works
        under it. A token it was answered is a term of its own (a library's,
        lost by its deadline): that one runs out as it should.
        """
        acquired, token, row_holder, *_, name = row[:7]
        known = self._answered_tokens.get((lock.key, holder), 0)
        return (
            not acquired
            and row_holder == holder
            and name == lock.name
            and int(token) > known
        )

    def _stuck(self, what: str) -> str:
        """The message for a statement that was given up after its bound."""
        return (
            f"the {what} did not finish within {self.statement_bound_s:.3g}s on "
            f"{self.describe()} and was cancelled: another session's open "
            "transaction likely holds the row or table it needs (look for 'idle "
            "in transaction' in pg_stat_activity), or the server is frozen"
        )

    def _open(self, purpose: str) -> _Wire:
        """A connection in autocommit, without prepared statements (no session state).

        From the DSN, or from the caller's factory, whose connection may come
        back from a pool inside a transaction. Bounded by
        :attr:`connect_bound_s`; the caller's thread only waits.

        Raises:
            DatabaseUnavailableError: the server cannot be reached or refused us;
                ``purpose`` (" to listen") says in the message what for.
        """
        opened: list[_Wire] = []

        def connect() -> _Wire:
            try:
                conn = self._connection()
            except psycopg.Error as exc:
                raise DatabaseUnavailableError(
                    f"cannot connect to {self.describe()}{purpose}: {self._clean(exc)}"
                ) from None
            try:
                opened.append(_Wire(conn))
            except OSError as exc:  # no descriptor left to duplicate its socket
                conn.close()
                raise DatabaseUnavailableError(
                    f"cannot connect to {self.describe()}{purpose}: {exc}"
                ) from None
            return opened[0]

        def close_late() -> None:
            # A connection that came after the caller gave up on it.
            for wire in opened:
                wire.close()

        try:
            return call_bounded(
                connect,
                self.connect_bound_s,
                interrupt=lambda: None,  # the attempt ends at its connect_timeout
                cleanup=close_late,
                name="leaderrun-connect",
            )
        except CallTimedOut:
            raise DatabaseUnavailableError(
                f"cannot connect to {self.describe()}{purpose}: no answer within "
                f"{self.connect_bound_s:.3g}s (a frozen server, or a proxy in "
                "front of it?)"
            ) from None

    def _connection(self) -> psycopg.Connection[Any]:
        """A new connection (on the worker thread), ready for lease statements."""
        if self._factory is None:
            return psycopg.connect(
                self._conninfo, autocommit=True, prepare_threshold=None
            )
        conn = self._factory()
        try:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                conn.rollback()
            conn.autocommit = True
            conn.prepare_threshold = None
        except BaseException:
            conn.close()
            raise
        return conn

    def init(self) -> InitOutcome:
        """Create leaderrun's tables if missing, and upgrade an older one of its own.

        Tables that are there and complete are left alone, so a role without
        CREATE (or that does not own them) can run ``init`` too.

        Raises:
            ForeignTableError: a table in leaderrun's place is not leaderrun's.
            SchemaMissingError: the schema is missing or the role may not create.
            DatabaseUnavailableError: the server cannot be reached, or a table
                to upgrade stayed locked by others.
        """
        session = self.connect()
        try:
            return session.init_tables()
        finally:
            session.close()

    def _clean(self, exc: BaseException) -> str:
        """The first line of a driver error, with the password masked."""
        text = (
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        return redact(text, self._secrets)


class PostgresSession:
    """One connection to the store, used by one thread at a time.

    Every method is bounded by the store's statement bound; once one was given
    up, every later one raises :class:`DatabaseUnavailableError` (reconnect).
    """

    def __init__(self, store: PostgresLeaseStore, wire: _Wire) -> None:
        self._store = store
        self._wire = wire
        self._conn = wire.conn

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

        With ``once_per``, refuse when the server's current window already ran;
        with ``history_keep``, record the run and prune the lock's history to
        that many runs, in the same statement.

        Raises:
            ConfigError: the lock's key is taken by a lock of another name.
            ForeignTableError: a table in leaderrun's place is not leaderrun's.
            SchemaMissingError: no table, and it cannot be created; or a table of
                an older version, which only ``init`` upgrades.
            StatementTimeoutError: the statement did not finish within its bound.
            DatabaseUnavailableError: the statement could not run.
        """
        params = {
            "key": lock.key,
            "name": lock.name,
            "holder": claim.holder,
            "lease_s": lease_s,
            "host": claim.host,
            "pid": claim.pid,
            "command": claim.command[:MAX_COMMAND_CHARS],
            "period_s": None if once_per is None else once_per.period_s,
            "offset_s": 0.0 if once_per is None else once_per.offset_s,
            "retry_failed": once_per is not None and once_per.retry_failed,
            "keep": history_keep,
        }
        row = self._acquire_row(lock, params)
        if row is not None and self._store.unanswered(lock, claim.holder, row):
            # Ours, yet never answered: an earlier acquire of this claim was
            # given up (a frozen server, a partition; its cancel never arrived)
            # and committed after all. Nobody runs under that token: give it
            # back rather than keep everyone out, us too, until it expires.
            unused = Lease(lock, claim.holder, int(row[1]))
            self.release(
                unused, RunEnd(RunOutcome.lost, None, in_window=once_per is not None)
            )
            log.warning(
                "gave back %s's fencing token %d: an acquire of ours was granted "
                "it, but its answer never came",
                lock,
                unused.token,
            )
            row = self._acquire_row(lock, params)
        if row is None:
            # The row did not exist in our snapshot, yet another statement
            # inserted it first: someone just took the lock.
            return AcquireResult(lease=None)
        acquired, token, holder, host, pid, expires_in_s, name, window, done = row
        if acquired:
            self._store.answered(lock, claim.holder, int(token))
            return AcquireResult(
                lease=Lease(lock, claim.holder, int(token)), window_start=window
            )
        if name != lock.name:
            raise key_collision(lock, name)
        return AcquireResult(
            lease=None,
            holder=holder,
            holder_host=host,
            holder_pid=pid,
            expires_in_s=expires_in_s,
            window_start=window,
            window_done=bool(done),
        )

    def _acquire_row(
        self, lock: LockId, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """The acquire statement's row, creating missing tables first if allowed."""
        what = f"acquire of lock {str(lock)!r}"
        try:
            return self._fetch(what, self._store._acquire, params)
        except ForeignTableError:
            raise
        except SchemaMissingError:
            if not self._store.create or not self._create_missing():
                raise
            return self._fetch(what, self._store._acquire, params)

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease by ``lease_s`` from the server's now; False if lost."""
        params = {**_lease_params(lease), "lease_s": lease_s}
        what = f"renewal of lock {str(lease.lock)!r}"
        return self._execute(what, self._store._renew, params) == 1

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row; False if it was no longer ours.

        With ``end``, close the run in the history (even when the lease is no
        longer ours), hold the lease until ``acquired_at + end.min_hold_s``, and
        record for ``--retry-failed`` whether a window's run ended well.
        """
        params = {
            **_lease_params(lease),
            "outcome": None if end is None else str(end.outcome),
            "exit_status": None if end is None else end.exit_status,
            "min_hold_s": 0.0 if end is None else end.min_hold_s,
            "window_ok": None if end is None else end.window_ok,
            "channel": release_channel(self._store.schema, lease.lock.key),
        }
        what = f"release of lock {str(lease.lock)!r}"
        return self._execute(what, self._store._release, params) == 1

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, of one lock or of all, newest first."""
        params = {"key": None if lock is None else lock.key, "limit": limit}
        return self._runs(f"history of {_which(lock)}", _HISTORY, params)

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        return self._runs("history of every lock", _LAST_RUNS, {})

    def _runs(
        self, what: str, template: LiteralString, params: dict[str, Any]
    ) -> list[RunRecord]:
        statement = _statement(template, self._store.schema)
        try:
            rows = self._run(
                what, lambda: self._conn.execute(statement, params).fetchall()
            )
        except ForeignTableError:
            raise
        except SchemaMissingError:
            if RUN_TABLE in self.inspect():
                raise  # a missing column: an older table that init upgrades
            return []  # nothing was ever recorded here
        return [RunRecord(*row) for row in rows]

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Rows of the lease table (all, or ``lock``'s) with the database's now()."""
        key = None if lock is None else lock.key
        rows = self._run(
            f"status of {_which(lock)}",
            lambda: self._conn.execute(self._store._snapshot, {"key": key}).fetchall(),
        )
        records = tuple(_record(row[1:]) for row in rows if row[1] is not None)
        return LeaseSnapshot(db_now=rows[0][0], records=records)

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
            row = self._fetch(
                f"operator release of lock {str(lock)!r}",
                self._store._operator_release,
                params,
            )
            if row is None:
                return None
            record = _record(row[1:])
            action = (
                ReleaseAction.freed if record.holder is None else ReleaseAction.revoked
            )
            return ReleaseResult(action, record, row[0])

        return release_outcome(lock, token, update, lambda: self.snapshot(lock))

    def check_settings(self) -> None:
        """Refuse a session whose commits the server may forget after a crash.

        A read, not a SET (``no-session-state``): through PgBouncer in
        transaction mode a SET would stay on whichever server connection ran it.

        Raises:
            DatabaseUnavailableError: ``synchronous_commit`` is off, or the
                check could not run.
        """
        row = self._fetch("check of synchronous_commit", _SYNCHRONOUS_COMMIT, {})
        value = str(row[0]) if row else ""
        if value in UNSAFE_SYNCHRONOUS_COMMIT:
            user = self._conn.info.user
            raise DatabaseUnavailableError(
                f"synchronous_commit is {value!r} for {user} on "
                f"{self._store.describe()}: a crash could forget a lease the server "
                "already granted; have a DBA run ALTER ROLE "
                f"{sql.Identifier(user).as_string()} SET synchronous_commit = on"
            )

    def inspect(self) -> Found:
        """What the catalog holds under leaderrun's table names in the schema."""
        return self._run(f"inspection of {self._store.schema}", self._inspect)

    def _inspect(self) -> Found:
        params = {"schema": self._store.schema, "names": list(TABLE_COLUMNS)}
        rows = self._conn.execute(_INSPECT, params).fetchall()
        return {name: (kind, tuple(columns)) for name, kind, columns in rows}

    def init_tables(self) -> InitOutcome:
        """``init``: create what is missing, upgrade an own table that is older.

        Raises:
            ForeignTableError: a table in leaderrun's place is not leaderrun's.
            SchemaMissingError: the schema is missing or the role may not create.
            DatabaseUnavailableError: a table to upgrade stayed locked by others.
        """
        schema = self._store.schema
        found = self.inspect()
        if (foreign := foreign_table(schema, found)) is not None:
            raise foreign
        if absent := [name for name in TABLE_COLUMNS if name not in found]:
            self._create_tables(absent)
            found = self.inspect()  # whoever made them: a racing first user too
            if (foreign := foreign_table(schema, found)) is not None:
                raise foreign
        outdated = missing_columns(found)
        for name, missing in outdated.items():
            self._upgrade(name, missing)
        if TABLE in absent:
            return InitOutcome.created
        return InitOutcome.upgraded if outdated or absent else InitOutcome.current

    def _create_missing(self) -> bool:
        """Create whichever of leaderrun's tables are missing; nothing else.

        Returns True when the failed statement is worth running again: the
        tables are there now (made here, or by a racing first user). Returns
        False, having changed nothing, when a table that is there is foreign or
        older: the caller's error says so.

        Raises:
            SchemaMissingError: the schema is missing or the role may not create.
        """
        found = self.inspect()
        if foreign_table(self._store.schema, found) is not None:
            return False
        if missing_columns(found):
            return False
        self._create_tables([name for name in TABLE_COLUMNS if name not in found])
        return True

    def _create_tables(self, names: list[str]) -> None:
        """Create each of these tables of leaderrun's, each in its own statement."""
        schema = self._store.schema
        for name in names:
            self._run(
                f"creation of {schema}.{name}", functools.partial(self._create, name)
            )

    def _create(self, name: str) -> None:
        """Create one table and its comment, in one transaction (in the worker)."""
        schema = self._store.schema
        try:
            with self._conn.transaction():
                for template in _CREATE[name]:
                    self._conn.execute(_statement(template, schema))
        except (e.DuplicateTable, e.UniqueViolation, e.DuplicateObject):
            # Two first users raced; the other one created it: nothing to do.
            # (Its table row type or catalog row came first: 42P07, 42710, 23505.)
            return
        except e.InvalidSchemaName:
            raise SchemaMissingError(
                f"schema {schema!r} does not exist; create it or pass another --schema"
            ) from None
        except e.InsufficientPrivilege:
            raise SchemaMissingError(
                f"table {schema}.{TABLE} does not exist and this role may not create "
                "it; " + missing_table_hint(schema, self._conn.info.user)
            ) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(
                f"cannot create {schema}.{name}: {self._store._clean(exc)}"
            ) from None
        log.info("created table %s.%s", schema, name)

    def _upgrade(self, name: str, missing: list[str]) -> None:
        """Add an older table's missing columns, never stalling its users for long.

        ALTER TABLE takes an ACCESS EXCLUSIVE lock; queued behind a reader it
        would hold up every renewal queued behind it. So each try waits at most
        INIT_LOCK_TIMEOUT_S for the lock (lock_timeout, in its own transaction)
        and the next comes after a pause in which the others run.

        Raises:
            DatabaseUnavailableError: every try found the table locked.
        """
        table = f"{self._store.schema}.{name}"
        if name not in _UPGRADE:
            raise DatabaseUnavailableError(
                f"{table} lacks the columns {', '.join(missing)} and this version "
                "cannot add them; recreate it in another --schema"
            )
        upgrade = _statement(_UPGRADE[name], self._store.schema)
        timeout = f"{round(INIT_LOCK_TIMEOUT_S * 1000)}ms"

        def alter() -> bool:
            try:
                with self._conn.transaction():
                    self._conn.execute(_LOCK_TIMEOUT, {"timeout": timeout})
                    self._conn.execute(upgrade)
            except e.LockNotAvailable:
                return False
            except e.InsufficientPrivilege:
                raise DatabaseUnavailableError(
                    f"{table} lacks the columns {', '.join(missing)} and only its "
                    f"owner may add them: run `leaderrun init --schema "
                    f"{self._store.schema}` as that role"
                ) from None
            return True

        for attempt in range(INIT_LOCK_TRIES):
            if attempt:
                time.sleep(INIT_RETRY_PAUSE_S)
            if self._run(f"upgrade of {table}", alter):
                log.info("upgraded table %s: added %s", table, ", ".join(missing))
                return
        raise DatabaseUnavailableError(
            f"could not lock {table} to upgrade it: {INIT_LOCK_TRIES} tries of "
            f"{INIT_LOCK_TIMEOUT_S:g}s each waited behind other sessions (a long "
            "query, or an open transaction on it); try again when it is quieter"
        )

    def close(self) -> None:
        """Close the connection; never raises.

        A session given up with a statement still running is closed by that
        statement's thread, once it returns.
        """
        if not self._wire.abandoned:
            self._wire.close()

    def _fetch(
        self, what: str, statement: LiteralString | sql.Composed, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        return self._run(what, lambda: self._conn.execute(statement, params).fetchone())

    def _execute(
        self, what: str, statement: sql.Composed, params: dict[str, Any]
    ) -> int:
        return self._run(what, lambda: self._conn.execute(statement, params).rowcount)

    def _run(self, what: str, work: Callable[[], _T]) -> _T:
        """Run ``work`` within the bound, its driver errors made leaderrun's."""

        def statements() -> _T:
            try:
                result = work()
            except psycopg.Error as exc:
                raise self._error(exc) from None
            self._check_idle()
            return result

        return self._store.bounded(self._wire, what, statements)

    def _check_idle(self) -> None:
        # no-session-state: a lease statement left inside a transaction would
        # freeze now() and hide the renewal from everyone else. Fail loudly.
        status = self._conn.info.transaction_status
        if status != TransactionStatus.IDLE:
            raise LeaderrunError(f"lease connection left in state {status.name}")

    def _error(self, exc: psycopg.Error) -> LeaderrunError:
        """The error for a statement's driver error, made on the worker thread.

        The connection is idle again (the failed statement's transaction has
        ended), so a table error is explained from the catalog, and a missing
        privilege with the exact GRANT.
        """
        store = self._store
        table = f"{store.schema}.{TABLE}"
        if isinstance(exc, e.UndefinedTable | e.UndefinedColumn):
            try:
                found = self._inspect()
            except psycopg.Error:
                found = None
            if found is not None:
                if (foreign := foreign_table(store.schema, found)) is not None:
                    return foreign
                for name, missing in missing_columns(found).items():
                    return outdated_table(store.schema, name, missing)
            if isinstance(exc, e.UndefinedColumn):
                return SchemaMissingError(
                    f"table {table} lacks columns this version needs; "
                    + missing_table_hint(store.schema, None)
                )
            return SchemaMissingError(
                f"table {table} does not exist; "
                + missing_table_hint(store.schema, None)
            )
        if isinstance(exc, e.InvalidSchemaName):
            return SchemaMissingError(
                f"schema {store.schema!r} does not exist; create it or pass "
                "another --schema"
            )
        if isinstance(exc, e.InsufficientPrivilege):
            grants = _missing_grants(self._conn, store.schema)
            return DatabaseUnavailableError(
                f"role {self._conn.info.user} lacks privileges on {table} "
                f"({store._clean(exc)}); have the table's owner run: {grants}"
            )
        # Everything else (a lost connection, a read-only standby after a
        # failover, a statement or lock timeout) is worth retrying elsewhere.
        return DatabaseUnavailableError(
            f"statement on {store.describe()} failed: {store._clean(exc)}"
        )


def _which(lock: LockId | None) -> str:
    return "every lock" if lock is None else f"lock {str(lock)!r}"


def _missing_grants(conn: psycopg.Connection[Any], schema: str) -> str:
    """The GRANT statements the connection's role lacks on the two tables.

    Best effort: without an answer, every grant is listed.
    """
    role = conn.info.user
    grantee = sql.Identifier(role).as_string()
    try:
        row = conn.execute(
            # By oid from the catalog: without USAGE on the schema the table
            # could not be named, yet its grants still count.
            "SELECT has_schema_privilege(%(schema)s, 'USAGE'), "
            "ARRAY(SELECT p FROM unnest(%(privileges)s::text[]) AS p, "
            "pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %(schema)s AND c.relname = %(table)s "
            "AND NOT has_table_privilege(c.oid, p)), "
            "ARRAY(SELECT p FROM unnest(%(run_privileges)s::text[]) AS p, "
            "pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %(schema)s AND c.relname = %(runs)s "
            "AND NOT has_table_privilege(c.oid, p))",
            {
                "schema": schema,
                "table": TABLE,
                "privileges": list(OPERATOR_PRIVILEGES),
                "runs": RUN_TABLE,
                "run_privileges": list(RUN_PRIVILEGES),
            },
        ).fetchone()
    except psycopg.Error:
        log.debug("cannot tell which grants are missing", exc_info=True)
        row = None
    grants = []
    if row is None or not row[0]:
        schema_id = sql.Identifier(schema).as_string()
        grants.append(f"GRANT USAGE ON SCHEMA {schema_id} TO {grantee}")
    for index, name, wanted in (
        (1, TABLE, OPERATOR_PRIVILEGES),
        (2, RUN_TABLE, RUN_PRIVILEGES),
    ):
        if row is None or row[index]:
            missing = ", ".join(row[index] if row else wanted)
            table = sql.Identifier(schema, name).as_string()
            grants.append(f"GRANT {missing} ON {table} TO {grantee}")
    return "; ".join(grants)


class PostgresListener:
    """A connection that LISTENs on one lock's release channel.

    Args:
        wire: an autocommit connection that has run ``LISTEN channel``.
        channel: the channel it listens on.
        clean: turns a driver error into a message without secrets.
    """

    def __init__(
        self,
        wire: _Wire,
        channel: str,
        clean: Callable[[BaseException], str],
    ) -> None:
        self._wire = wire
        self._conn = wire.conn
        self._channel = channel
        self._clean = clean
        # Kept: a broken connection's fileno() raises, yet select() must still
        # see the socket become readable (EOF) so that drain() finds out.
        self._fd = self._conn.fileno()

    def fileno(self) -> int:
        """The connection's socket."""
        return self._fd

    def drain(self) -> bool:
        """Read every notification already received; True if one was ours.

        Sends nothing and never waits: it reads what the socket already holds.

        Raises:
            DatabaseUnavailableError: the connection is broken.
        """
        try:
            # All of them, not up to the first of ours: one left unread would
            # wake the next sleep at once, for a statement wasted.
            channels: list[str] = []
            while batch := [n.channel for n in self._conn.notifies(timeout=0)]:
                channels += batch
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(
                f"the listening connection failed: {self._clean(exc)}"
            ) from None
        return self._channel in channels

    def close(self) -> None:
        """Close the connection; never raises."""
        self._wire.close()


def _ignore_notification(notification: psycopg.Notify) -> None:
    """Drop a notification that reached a lease connection (see ``connect``)."""


def _record(row: tuple[Any, ...]) -> LeaseRecord:
    key, name, holder, token, acquired, renewed, expires, host, pid, command = row
    return LeaseRecord(
        key=key,
        name=name,
        holder=holder,
        token=token,
        acquired_at=acquired,
        renewed_at=renewed,
        expires_at=expires,
        host=host,
        pid=pid,
        command=command,
    )


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"key": lease.lock.key, "holder": lease.holder, "token": lease.token}
