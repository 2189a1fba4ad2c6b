"""The PostgreSQL lease store: connections, the session's dialect, the listener.

The statements are in :mod:`leaderrun.stores.postgres_sql`; what the session
does with them it shares with SQLite (:class:`leaderrun.stores.sql.SqlSession`).
This module opens connections and runs statements on them, and maps psycopg's
errors to leaderrun's. Connections carry no session state (``no-session-state``,
docs/safety.md): autocommit, no SET, no advisory locks, no prepared
statements, so they work through PgBouncer in transaction mode.

Every statement is bounded (``bounded-statements``): it runs on a worker thread
for at most the store's bound, and one given up is cancelled on the server
(:class:`_Wire`), so that it neither waits on there nor commits later.
``statement_timeout`` cannot do this: it needs a SET or a startup option,
which PgBouncer in transaction mode does not carry, and no server-side timer
helps against a frozen server anyway.

leaderrun alters only its own tables (``own-tables-only``): it refuses anything
else in their place, and upgrades its own only in ``init``, never on the hot
path.
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
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psycopg
from psycopg import errors as e
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo
from psycopg.pq import TransactionStatus

from leaderrun.bounded import CallTimedOut, call_bounded
from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    ListenRefusedError,
    SchemaMissingError,
)
from leaderrun.lease import QUEUE_PLACE_LEASES, Lease, LockId
from leaderrun.redact import dsn_secrets, redact
from leaderrun.runs import RunEnd
from leaderrun.stores.base import RUN_TABLE, TABLE, Claim, InitOutcome, Row
from leaderrun.stores.postgres_sql import (
    CREATE,
    GRANTED,
    INSPECT,
    LISTEN,
    LOCK_TIMEOUT,
    MISSING_GRANTS,
    QUERIES,
    QUEUE_QUERIES,
    SYNCHRONOUS_COMMIT,
    TABLE_COLUMNS,
    UPGRADE,
    Found,
    foreign_table,
    missing_columns,
    missing_table_hint,
    outdated_table,
    release_channel,
    statement,
    wake_channel,
)
from leaderrun.stores.sql import SqlSession, SqlStore

if TYPE_CHECKING:
    from leaderrun.slots import OncePer

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")

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

UNSAFE_SYNCHRONOUS_COMMIT = frozenset({"off"})
"""``synchronous_commit`` values under which an acknowledged lease may vanish.

With ``off`` a crash loses the last commits the server already acknowledged:
an acquire (so its fencing token is handed out twice) or a renewal (so another
node takes the lock while this one still runs). ``local`` is crash-safe on one
server; what it means with standbys is in the README ("Production").
"""

ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]
"""Opens a new psycopg connection; given to a store instead of a DSN."""

_WHAT: Mapping[str, str] = {
    "acquire": "acquire of {lock}",
    "acquire_queued": "acquire of {lock}",
    "renew": "renewal of {lock}",
    "release": "release of {lock}",
    "snapshot": "status of {lock}",
    "operator_release": "operator release of {lock}",
    "history": "history of {lock}",
    "last_runs": "history of {lock}",
    "run_output": "output of {lock}'s run",
    "leave": "leaving the queue of {lock}",
}
"""How messages name each query; ``{lock}`` is the lock, or every lock."""


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


class PostgresLeaseStore(SqlStore["PostgresSession"]):
    """Leases in ``<schema>.leader_lease`` of one PostgreSQL database.

    Args:
        dsn: a libpq connection string or URI; empty means libpq's environment.
        schema: the schema of the lease table.
        attempt_budget_s: how long one attempt may take; bounds every statement
            (:attr:`bound_s`) and sets the TCP timeouts so a dead peer frees a
            blocked socket read in about that time.
        create: create the table on first use if it is missing.
        connection_factory: opens each connection instead of ``dsn`` (which then
            only names the server in messages). Every connection it returns is
            switched to autocommit without prepared statements (``no-session-state``).
        wall_clock: our guess of the server's now (Unix seconds), around which
            the slot tables of ``--once-per``/``--schedule`` are built.
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        *,
        attempt_budget_s: float = 5.0,
        create: bool = True,
        connection_factory: ConnectionFactory | None = None,
        wall_clock: Callable[[], float] = time.time,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(create=create, bound_s=attempt_budget_s, labels=labels)
        self.schema = schema
        self._factory = connection_factory
        # Only a guess: the server's own now() chooses the slot.
        self.wall_clock = wall_clock
        self._secrets = dsn_secrets(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"invalid DSN ({self.labels['dsn']}): {self.clean(exc)}; use "
                "key=value pairs or a postgresql:// URI"
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
        self.statements = {
            name: statement(text, schema)
            for name, text in {**QUERIES, **QUEUE_QUERIES}.items()
        }
        """Each named query's statement, for this schema's tables."""

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

    def session(self) -> PostgresSession:
        """A session on a new autocommit connection without prepared statements.

        Raises:
            DatabaseUnavailableError: the server cannot be reached or refused us.
        """
        return PostgresSession(self, self._open(""))

    def listen(self, lock: LockId, holder: str) -> PostgresListener:
        """Open a new connection that listens for ``holder``'s turn at ``lock``.

        For ``--listen-dsn``: a connection of its own, to a server or pool that
        keeps session state (LISTEN is session state, which PgBouncer in
        transaction mode does not keep).

        Raises:
            ListenRefusedError: the server refused LISTEN.
            DatabaseUnavailableError: the connection could not be made.
        """
        channels = (wake_channel(holder),)
        session = PostgresSession(self, self._open(" to listen"))
        try:
            session.listen(lock, channels[0])
        except BaseException:
            session.close()
            raise
        return PostgresListener(session.wire, channels, self.clean)

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
                    f"cannot connect to {self.describe()}{purpose}: {self.clean(exc)}"
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

    def clean(self, exc: BaseException) -> str:
        """The first line of a driver error, with the password masked."""
        text = (
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        return redact(text, self._secrets)


class PostgresSession(SqlSession):
    """One connection to the store, used by one thread at a time.

    Every call is bounded by the store's bound; once one was given up, every
    later one raises :class:`DatabaseUnavailableError` (reconnect).
    """

    _store: PostgresLeaseStore

    def __init__(self, store: PostgresLeaseStore, wire: _Wire) -> None:
        super().__init__(store)
        self.wire = wire
        """The connection, and the means to cancel its statement."""
        self._conn = wire.conn
        self._wake: tuple[str, ...] = ()
        self._unsent_listen: str | None = None
        self.woken = False
        """A wake-up of ours arrived while a statement ran (see ``drain``)."""

    def prepare(self) -> None:
        """Make the connection ready for lease statements; sends nothing.

        The check that the server will not forget a lease rides on each
        acquire statement (``synchronous_commit`` in its row), so that an
        acquire is one statement on a new connection too.
        """
        conn = self._conn
        log.debug(
            "connected to %s (backend pid %s, server %s)",
            self._store.describe(),
            conn.info.backend_pid,
            conn.info.server_version,
        )
        # A notification that arrives while a statement runs is read by psycopg
        # and handed here: ours (a waiter's wake-up, see listen_here) is noted,
        # any other dropped. With no handler psycopg would keep them all in a
        # backlog that nobody reads: behind PgBouncer in transaction mode, a
        # pooled server connection that some waiter's LISTEN stuck to serves
        # everyone.
        conn.add_notify_handler(self._heard)

    def check_settings(self) -> None:
        """Refuse a session whose commits the server may forget after a crash.

        ``init``'s check; a run's rides on its acquire statement. A read, not
        a SET (``no-session-state``): through PgBouncer in transaction mode a
        SET would stay on whichever server connection ran it.

        Raises:
            DatabaseUnavailableError: ``synchronous_commit`` is off, or the
                check could not run.
        """
        row = self._run(
            "check of synchronous_commit",
            lambda: self._conn.execute(SYNCHRONOUS_COMMIT).fetchone(),
        )
        self._refuse_unsafe(str(row[0]) if row else "")

    def _refuse_unsafe(self, synchronous_commit: str) -> None:
        """Raise if the server may forget a commit it acknowledged.

        Raises:
            DatabaseUnavailableError: ``synchronous_commit`` is off.
        """
        if synchronous_commit in UNSAFE_SYNCHRONOUS_COMMIT:
            user = self._conn.info.user
            raise DatabaseUnavailableError(
                f"synchronous_commit is {synchronous_commit!r} for {user} on "
                f"{self._store.describe()}: a crash could forget a lease the server "
                "already granted; have a DBA run ALTER ROLE "
                f"{sql.Identifier(user).as_string()} SET synchronous_commit = on"
            )

    def listen_here(self, lock: LockId, holder: str) -> _SessionListener:
        """Listen for ``holder``'s turn at ``lock`` on this very connection.

        The LISTEN is sent with the next acquire, in the same round trip and
        transaction, so no release can fall between the two: a waiter keeps
        one connection, and its acquire stays one round trip. Behind PgBouncer
        in transaction mode nothing is ever delivered (see ``--listen-dsn``);
        the waiter then sleeps until the holder's expiry, as without LISTEN.
        """
        channels = (wake_channel(holder),)
        self._wake = channels
        self._unsent_listen = channels[0]
        return _SessionListener(self, channels)

    def _heard(self, notification: psycopg.Notify) -> None:
        # On whichever thread reads the connection: only a flag is set.
        if notification.channel in self._wake:
            self.woken = True

    def drain(self, channels: tuple[str, ...]) -> bool:
        """Read what the idle connection holds; True if woken since the last drain.

        Raises:
            DatabaseUnavailableError: the connection is broken.
        """
        woken, self.woken = self.woken, False
        return _drain(self._conn, channels, self._store.clean) or woken

    def inspect(self) -> Found:
        """What the catalog holds under leaderrun's table names in the schema."""
        return self._run(f"inspection of {self._store.schema}", self._inspect)

    def _inspect(self) -> Found:
        params = {"schema": self._store.schema, "names": list(TABLE_COLUMNS)}
        rows = self._conn.execute(INSPECT, params).fetchall()
        return {name: (kind, tuple(columns)) for name, kind, columns in rows}

    def init(self) -> InitOutcome:
        """``init``: create what is missing, upgrade an own table that is older.

        Tables that are there and complete are left alone, so a role without
        CREATE (or that does not own them) can run ``init`` too.

        Raises:
            ForeignTableError: a table in leaderrun's place is not leaderrun's.
            SchemaMissingError: the schema is missing or the role may not create.
            DatabaseUnavailableError: the server may forget a commit, or a
                table to upgrade stayed locked by others.
        """
        self.check_settings()
        schema = self._store.schema
        found = self.inspect()
        foreign = foreign_table(schema, found, self._store.labels["schema"])
        if foreign is not None:
            raise foreign
        if absent := [name for name in TABLE_COLUMNS if name not in found]:
            self._create_tables(absent)
            found = self.inspect()  # whoever made them: a racing first user too
            foreign = foreign_table(schema, found, self._store.labels["schema"])
            if foreign is not None:
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
                for template in CREATE[name]:
                    self._conn.execute(statement(template, schema))
        except (e.DuplicateTable, e.UniqueViolation, e.DuplicateObject):
            # Two first users raced; the other one created it: nothing to do.
            # (Its table row type or catalog row came first: 42P07, 42710, 23505.)
            return
        except e.InvalidSchemaName:
            raise SchemaMissingError(
                f"schema {schema!r} does not exist; create it or pass another "
                + self._store.labels["schema"]
            ) from None
        except e.InsufficientPrivilege:
            raise SchemaMissingError(
                f"table {schema}.{TABLE} does not exist and this role may not create "
                "it; " + missing_table_hint(schema, self._conn.info.user)
            ) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(
                f"cannot create {schema}.{name}: {self._store.clean(exc)}"
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
        if name not in UPGRADE:
            raise DatabaseUnavailableError(
                f"{table} lacks the columns {', '.join(missing)} and this version "
                "cannot add them; recreate it in another "
                + self._store.labels["schema"]
            )
        upgrade = statement(UPGRADE[name], self._store.schema)
        timeout = f"{round(INIT_LOCK_TIMEOUT_S * 1000)}ms"

        def alter() -> bool:
            try:
                with self._conn.transaction():
                    self._conn.execute(LOCK_TIMEOUT, {"timeout": timeout})
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

    def listen(self, lock: LockId, channel: str) -> None:
        """LISTEN on ``channel`` for releases of ``lock``, bounded.

        Raises:
            ListenRefusedError: the server refused LISTEN.
        """
        listen = sql.SQL(LISTEN).format(channel=sql.Identifier(channel))

        def work() -> None:
            try:
                self._conn.execute(listen)
            except psycopg.Error as exc:
                raise ListenRefusedError(
                    f"LISTEN refused: {self._store.clean(exc)}"
                ) from None

        self._bounded(f"LISTEN for lock {str(lock)!r}", work)

    # --- the dialect -----------------------------------------------------------------

    def _query(
        self, name: str, params: Mapping[str, Any], lock: LockId | None
    ) -> list[Row]:
        what = _WHAT[name].format(lock=_which(lock))
        if name == "acquire" and params.get("queued"):
            name = "acquire_queued"  # the --wait queue's form of the same
        query = self._store.statements[name]
        channel = self._unsent_listen if name.startswith("acquire") else None
        if channel is None:
            return self._run(what, lambda: _rows(self._conn.execute(query, params)))

        def listen_and_query() -> list[Row]:
            # One round trip, one implicit transaction (a single Sync): the
            # LISTEN takes effect as the acquire commits.
            listen = sql.SQL(LISTEN).format(channel=sql.Identifier(channel))
            with self._conn.pipeline():
                self._conn.execute(listen)
                cursor = self._conn.execute(query, params)
            self._unsent_listen = None
            return _rows(cursor)

        return self._run(what, listen_and_query)

    def _acquire_row(self, lock: LockId, params: Mapping[str, Any]) -> Row | None:
        row = super()._acquire_row(lock, params)
        if row is not None:
            self._refuse_unsafe(str(row["synchronous_commit"]))
        return row

    def _queue_params(
        self, claim: Claim, lease_s: float, queued: bool
    ) -> dict[str, Any]:
        return {
            "queued": queued,
            "channel": wake_channel(claim.holder),
            "place_s": QUEUE_PLACE_LEASES * lease_s,
        }

    def leave_queue(self, lock: LockId, claim: Claim) -> None:
        """Give up ``claim``'s place in the queue; wake the next if the lock is free."""
        self._query("leave", {"key": lock.key, "holder": claim.holder}, lock)

    def _slot_params(
        self, once_per: OncePer | None, db_now_s: float | None
    ) -> dict[str, Any]:
        # The server picks its now's slot from a table built here (the SQL has
        # no cron and no time zone rules): around our clock, which is usually
        # within milliseconds of the server's, else around the server's now.
        if once_per is None:
            return {"slot_opens": None, "slot_starts": None, "slots_until": None}
        guess_s = self._store.wall_clock() if db_now_s is None else db_now_s
        table = once_per.table(guess_s)
        return {
            "slot_opens": [slot.opens_s for slot in table.slots],
            "slot_starts": [slot.start_s for slot in table.slots],
            "slots_until": table.until_s,
        }

    def _release_params(self, lease: Lease, end: RunEnd | None) -> dict[str, Any]:
        # The release wakes the lock's waiters (leaderrun.handoff) on this channel.
        channel = release_channel(self._store.schema, lease.lock.key)
        return {**super()._release_params(lease, end), "channel": channel}

    def _to_datetime(self, value: Any) -> datetime:
        return cast(datetime, value)  # timestamptz: psycopg's aware datetime

    def _has_run_table(self) -> bool:
        return RUN_TABLE in self.inspect()

    def _transaction_left_open(self) -> str | None:
        status = self._conn.info.transaction_status
        return None if status == TransactionStatus.IDLE else status.name

    def _interrupt(self) -> None:
        self.wire.interrupt(min(self._store.bound_s, CANCEL_TIMEOUT_S))

    def _close_connection(self) -> None:
        self.wire.close()

    def _stuck(self, what: str, bound_s: float) -> str:
        return (
            f"the {what} did not finish within {bound_s:.3g}s on "
            f"{self._store.describe()} and was cancelled: another session's open "
            "transaction likely holds the row or table it needs (look for 'idle "
            "in transaction' in pg_stat_activity), or the server is frozen"
        )

    def _given_up(self, what: str) -> str:
        return (
            f"the connection to {self._store.describe()} was given up after a "
            "statement that did not finish; open a new session"
        )

    def _run(self, what: str, work: Callable[[], _T]) -> _T:
        """Run ``work`` within the bound, its driver errors made leaderrun's."""

        def statements() -> _T:
            try:
                result = work()
            except psycopg.Error as exc:
                raise self._error(exc) from None
            self._check_idle()
            return result

        return self._bounded(what, statements)

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
                foreign = foreign_table(store.schema, found, store.labels["schema"])
                if foreign is not None:
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
                f"another {store.labels['schema']}"
            )
        if isinstance(exc, e.InsufficientPrivilege):
            grants = _missing_grants(self._conn, store.schema)
            return DatabaseUnavailableError(
                f"role {self._conn.info.user} lacks privileges on {table} "
                f"({store.clean(exc)}); have the table's owner run: {grants}"
            )
        # Everything else (a lost connection, a read-only standby after a
        # failover, a statement or lock timeout) is worth retrying elsewhere.
        return DatabaseUnavailableError(
            f"statement on {store.describe()} failed: {store.clean(exc)}"
        )


def _rows(cursor: psycopg.Cursor[Any]) -> list[Row]:
    """A statement's rows by column name; one empty row per row it changed if none."""
    if cursor.description is None:
        return [{}] * max(cursor.rowcount, 0)
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _which(lock: LockId | None) -> str:
    return "every lock" if lock is None else f"lock {str(lock)!r}"


def _missing_grants(conn: psycopg.Connection[Any], schema: str) -> str:
    """The GRANT statements the connection's role lacks on leaderrun's tables.

    Best effort: without an answer, every grant is listed.
    """
    role = conn.info.user
    grantee = sql.Identifier(role).as_string()
    lacking: dict[str | None, list[str]] | None
    try:
        rows = conn.execute(
            MISSING_GRANTS,
            {
                "schema": schema,
                "names": [name for name, _ in GRANTED],
                "privileges": [",".join(wanted) for _, wanted in GRANTED],
            },
        ).fetchall()
        lacking = {name: list(privileges) for name, privileges in rows}
    except psycopg.Error:
        log.debug("cannot tell which grants are missing", exc_info=True)
        lacking = None
    grants = []
    if lacking is None or None in lacking:  # the schema's USAGE
        schema_id = sql.Identifier(schema).as_string()
        grants.append(f"GRANT USAGE ON SCHEMA {schema_id} TO {grantee}")
    for name, wanted in GRANTED:
        missing = list(wanted) if lacking is None else lacking.get(name)
        if missing:
            table = sql.Identifier(schema, name).as_string()
            grants.append(f"GRANT {', '.join(missing)} ON {table} TO {grantee}")
    return "; ".join(grants)


def _drain(
    conn: psycopg.Connection[Any],
    channels: tuple[str, ...],
    clean: Callable[[BaseException], str],
) -> bool:
    """Read the notifications an idle connection holds; True if one is on ``channels``.

    Sends nothing and never waits: it reads what the socket already holds.
    All of them, not up to the first of ours: one left unread would wake the
    next sleep at once, for a statement wasted.

    Raises:
        DatabaseUnavailableError: the connection is broken.
    """
    pgconn = conn.pgconn
    heard = False
    try:
        pgconn.consume_input()
        while (notification := pgconn.notifies()) is not None:
            heard = heard or notification.relname.decode() in channels
    except psycopg.Error as exc:
        raise DatabaseUnavailableError(
            f"the listening connection failed: {clean(exc)}"
        ) from None
    return heard


class _SessionListener:
    """The lease session itself, listening for its waiter's turn (``listen_here``)."""

    def __init__(self, session: PostgresSession, channels: tuple[str, ...]) -> None:
        self._session = session
        self._channels = channels
        # Kept: a broken connection's fileno() raises, yet select() must still
        # see the socket become readable (EOF) so that drain() finds out.
        self._fd = session.wire.conn.fileno()

    def fileno(self) -> int:
        """The session's socket."""
        return self._fd

    def drain(self) -> bool:
        """True if our turn was announced (now, or during the last statement).

        Raises:
            DatabaseUnavailableError: the connection is broken.
        """
        return self._session.drain(self._channels)

    def close(self) -> None:
        """Nothing to close: the session belongs to the acquire loop."""


class PostgresListener:
    """A connection of its own that LISTENs for one waiter's turn (``--listen-dsn``).

    Args:
        wire: an autocommit connection that has run ``LISTEN`` on the first channel.
        channels: the channels whose notifications wake the waiter.
        clean: turns a driver error into a message without secrets.
    """

    def __init__(
        self,
        wire: _Wire,
        channels: tuple[str, ...],
        clean: Callable[[BaseException], str],
    ) -> None:
        self._wire = wire
        self._conn = wire.conn
        self._channels = channels
        self._clean = clean
        self._fd = self._conn.fileno()  # kept, as _SessionListener's

    def fileno(self) -> int:
        """The connection's socket."""
        return self._fd

    def drain(self) -> bool:
        """Read every notification already received; True if one was ours.

        Raises:
            DatabaseUnavailableError: the connection is broken.
        """
        return _drain(self._conn, self._channels, self._clean)

    def close(self) -> None:
        """Close the connection; never raises."""
        self._wire.close()
