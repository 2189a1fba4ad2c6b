"""The lease stores under test, and the helpers every store test shares.

``backend`` runs a test once per store: ``[memory]``; ``[sqlite]`` on a file of
its own, its clocks set by hand (``tests.helpers.sqlite_clocks.SetClock``);
``[postgres]`` on the session's server, in a schema of the suite's own (marked
``pg``). ``sql_backend`` runs it on the two SQL stores only; those have a DSN,
and their leases are taken on the real clocks, so that a ``leaderrun``
process sees them as the test does.

No test sleeps to let store time pass. A lease is ended by setting its row's
expiry to the store's now (``Backend.expire``); time passes
(``Backend.advance``) by moving the memory and SQLite stores' clocks, and on
PostgreSQL, whose clock is the server's, by ageing the lock's rows: the same,
as long as the test looks at that lock only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

from leaderrun.lease import Lease, LockId, parse_lock_id
from leaderrun.stores.base import (
    RUN_TABLE,
    TABLE,
    AcquireResult,
    Claim,
    LeaseRecord,
    ManagedStore,
    OperatorSession,
)
from leaderrun.stores.memory import InMemoryLeaseStore
from leaderrun.stores.postgres import PostgresLeaseStore
from leaderrun.stores.sqlite import SqliteLeaseStore
from leaderrun.testing import FakeClock
from tests.helpers.sqlite_clocks import SetClock, other_boot_id
from tests.helpers.waiting import wait_until

Admin = Callable[[], psycopg.Connection[TupleRow]]

LEASE_S = 30.0
"""A lease no test outlives by accident."""

START_UNIX_S = 1_795_000_000.0
"""Where the moved clocks start: 2026-11-18 07:06:40 UTC, 400 s into an hour."""

BOUND_S = 1.0
"""The statement bound of a store made to give up (``Backend.bounded_store``)."""

CANCELLED_WITHIN_S = 5.0
"""How long the server may take to act on a cancel request."""

MARGIN_S = 1.5
"""Scheduling slack on a busy two-core host, on top of a bound."""

WAIT_S = 60.0
"""The bound on waiting for threads and the server; generous for a busy host."""


def claim(n: int, command: str = "job") -> Claim:
    """The claim of contender ``n``, each with its own holder identity."""
    return Claim(holder=f"host{n}:{n}:nonce", host=f"host{n}", pid=n, command=command)


def acquired(result: AcquireResult) -> Lease:
    """The lease an acquire was granted; fails the test if it was refused."""
    assert result.lease is not None, result
    return result.lease


def new_name(prefix: str) -> str:
    """A schema, role or lock name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def race(count: int, contend: Callable[[int, threading.Barrier], Any]) -> list[Any]:
    """Run ``contend(n, barrier)`` on ``count`` threads; their results or errors.

    Each waits at the barrier (``barrier.wait(WAIT_S)``) to start at once.
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(n: int) -> None:
        try:
            results[n] = contend(n, barrier)
        except Exception as exc:
            barrier.abort()
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a contender hung"
    return results


class Backend(ABC):
    """One kind of store, as the tests drive it: its store, sessions and time."""

    kind: str

    def __init__(self, store: ManagedStore) -> None:
        self.store = store
        self._opened: list[OperatorSession] = []

    def session(self) -> OperatorSession:
        """A new session on :attr:`store`, closed when the test ends."""
        opened = self.store.connect()
        self._opened.append(opened)
        return opened

    def take(self, lock: LockId, n: int = 1, lease_s: float = LEASE_S) -> Lease:
        """Acquire ``lock`` for contender ``n`` on a session of its own."""
        with contextlib.closing(self.store.connect()) as session:
            return acquired(session.acquire(lock, claim(n), lease_s))

    def record(self, lock: LockId) -> LeaseRecord:
        """The lock's row, as ``status`` reads it."""
        (found,) = self.store.snapshot(lock).records
        return found

    def close(self) -> None:
        """Close every session the test opened."""
        for opened in self._opened:
            opened.close()

    @abstractmethod
    def expire(self, lock: LockId) -> None:
        """End the lock's lease now, in the store's time: its holder is kept."""

    @abstractmethod
    def advance(self, lock: LockId, seconds: float) -> None:
        """Let ``seconds`` of store time pass, as far as ``lock`` can tell.

        Its lease, runs and ``--once-per`` window age alike, so a whole period
        later is the next window.
        """

    @abstractmethod
    def held_up(self, lock: LockId) -> contextlib.AbstractContextManager[None]:
        """Inside the block, statements on ``lock`` wait for another session."""

    @abstractmethod
    def bounded_store(self) -> ManagedStore:
        """A store on the same leases whose calls give up after about BOUND_S."""

    @abstractmethod
    def fresh_store(self) -> ManagedStore:
        """A store whose tables do not exist yet."""

    @abstractmethod
    def twin_store(self) -> ManagedStore:
        """Another store object on the same leases, as another process has."""


class MemoryBackend(Backend):
    """The in-memory store on a FakeClock."""

    kind = "memory"

    def __init__(self) -> None:
        self.clock = FakeClock(START_UNIX_S)
        self.memory = InMemoryLeaseStore(self.clock)
        super().__init__(self.memory)

    def expire(self, lock: LockId) -> None:
        row = self.memory.rows[lock.key]
        expires_at_s = min(row.expires_at_s, self.clock())
        self.memory.rows[lock.key] = replace(row, expires_at_s=expires_at_s)

    def advance(self, lock: LockId, seconds: float) -> None:
        self.clock.advance(seconds)

    @contextlib.contextmanager
    def held_up(self, lock: LockId) -> Iterator[None]:
        # Its statements cannot wait: they time out at once, as after a wait.
        self.memory.failing |= {"acquire", "renew", "release", "operator_release"}
        try:
            yield
        finally:
            self.memory.failing.clear()

    def bounded_store(self) -> ManagedStore:
        return self.memory

    def fresh_store(self) -> ManagedStore:
        return InMemoryLeaseStore(self.clock)

    def twin_store(self) -> ManagedStore:
        return self.memory  # its leases live in this object only


class SqliteBackend(Backend):
    """A SQLite file of the test's own, on clocks set by hand (or the real ones)."""

    kind = "sqlite"

    def __init__(self, directory: Path, *, real_clock: bool = False) -> None:
        self.directory = directory
        self.path = directory / "leases.db"
        self.clock = (
            None if real_clock else SetClock(other_boot_id(), 1000.0, START_UNIX_S)
        )
        super().__init__(SqliteLeaseStore(self.path, clock=self.clock))
        self.dsn = f"sqlite://{self.path}"

    def admin(self) -> sqlite3.Connection:
        """An autocommit connection to read and tamper with the file."""
        return sqlite3.connect(self.path, isolation_level=None, timeout=30)

    def expire(self, lock: LockId) -> None:
        now = self.sqlite.clock.now()
        with contextlib.closing(self.admin()) as conn:
            conn.execute(
                "UPDATE leader_lease SET expires_boot_s = min(expires_boot_s, ?)"
                " WHERE lock_key = ?",
                (now.boot_s, lock.key),
            )

    def advance(self, lock: LockId, seconds: float) -> None:
        assert self.clock is not None, "the real clocks cannot be moved"
        self.clock.advance(seconds)

    @contextlib.contextmanager
    def held_up(self, lock: LockId) -> Iterator[None]:
        with contextlib.closing(self.admin()) as blocker:
            blocker.execute("BEGIN IMMEDIATE")  # the file's write lock
            try:
                yield
            finally:
                blocker.execute("ROLLBACK")

    def bounded_store(self) -> ManagedStore:
        busy_s = BOUND_S / 2
        return SqliteLeaseStore(self.path, busy_s=busy_s, clock=self.clock)

    def fresh_store(self) -> ManagedStore:
        return SqliteLeaseStore(self.directory / "fresh.db", clock=self.clock)

    def twin_store(self) -> ManagedStore:
        return SqliteLeaseStore(self.path, clock=self.clock)

    @property
    def sqlite(self) -> SqliteLeaseStore:
        assert isinstance(self.store, SqliteLeaseStore)
        return self.store


class PostgresBackend(Backend):
    """The session's server, in ``schema``; its clock is the server's."""

    kind = "postgres"

    def __init__(self, dsn: str, schema: str, admin: Admin) -> None:
        super().__init__(PostgresLeaseStore(dsn, schema))
        self.dsn = dsn
        self.schema = schema
        self.admin = admin
        self._schemas: list[str] = []

    def execute(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run ``query``, with {lease} and {runs} naming the schema's tables."""
        statement = sql.SQL(query).format(
            lease=sql.Identifier(self.schema, TABLE),
            runs=sql.Identifier(self.schema, RUN_TABLE),
        )
        with self.admin() as conn:
            cursor = conn.execute(statement, args)
            return cursor.fetchall() if cursor.description else []

    def expire(self, lock: LockId) -> None:
        expire_row(self.admin, self.schema, lock)

    def advance(self, lock: LockId, seconds: float) -> None:
        age = "make_interval(secs => %s)"
        self.execute(
            f"UPDATE {{lease}} SET acquired_at = acquired_at - {age},"
            f" renewed_at = renewed_at - {age}, expires_at = expires_at - {age},"
            f" window_start = window_start - {age} WHERE lock_key = %s",
            *[seconds] * 4,
            lock.key,
        )
        self.execute(
            f"UPDATE {{runs}} SET started_at = started_at - {age},"
            f" finished_at = finished_at - {age}, window_start = window_start - {age}"
            " WHERE lock_key = %s",
            *[seconds] * 3,
            lock.key,
        )

    @contextlib.contextmanager
    def held_up(self, lock: LockId) -> Iterator[None]:
        # An operator's open transaction holding the row. It ends only once
        # nothing waits behind it: a statement given up must have been
        # cancelled, not run late.
        with row_locked(self.admin, self.schema, lock) as pid:
            yield
            nobody_left_waiting(self.admin, pid)

    def bounded_store(self) -> ManagedStore:
        return PostgresLeaseStore(self.dsn, self.schema, attempt_budget_s=BOUND_S)

    def fresh_store(self) -> ManagedStore:
        schema = new_name("lr_fresh")
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self._schemas.append(schema)
        return PostgresLeaseStore(self.dsn, schema)

    def twin_store(self) -> ManagedStore:
        return PostgresLeaseStore(self.dsn, self.schema)

    def close(self) -> None:
        super().close()
        with self.admin() as conn:
            for schema in self._schemas:
                conn.execute(
                    sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
                )


@contextlib.contextmanager
def open_transaction(
    admin: Admin, statement: sql.Composed, *args: Any
) -> Iterator[int]:
    """Another session's transaction that ran ``statement`` and stays open.

    Yields that session's backend pid; commits (changing nothing) on the way out.
    """
    with admin() as conn, conn.transaction():
        conn.execute(statement, args)
        yield conn.info.backend_pid


def row_locked(
    admin: Admin, schema: str, lock: LockId
) -> contextlib.AbstractContextManager[int]:
    """An open transaction holding the lock's row with SELECT ... FOR UPDATE."""
    return open_transaction(
        admin,
        sql.SQL("SELECT 1 FROM {} WHERE lock_key = %s FOR UPDATE").format(
            sql.Identifier(schema, TABLE)
        ),
        lock.key,
    )


def lease_row(admin: Admin, schema: str, lock: LockId) -> tuple[Any, ...]:
    """(holder, token, expires_at) of the lock's row, as the server has it."""
    with admin() as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT holder, token, expires_at FROM {} WHERE lock_key = %s"
            ).format(sql.Identifier(schema, TABLE)),
            (lock.key,),
        ).fetchone()
    assert row is not None
    return row


def expire_row(admin: Admin, schema: str, lock: LockId) -> None:
    """End the lock's lease now in the server's time; the holder is kept."""
    with admin() as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET expires_at = least(expires_at, now())"
                " WHERE lock_key = %s"
            ).format(sql.Identifier(schema, TABLE)),
            (lock.key,),
        )


def waiting_behind(admin: Admin, blocker_pid: int) -> list[tuple[Any, ...]]:
    """The sessions waiting for a lock that ``blocker_pid`` holds: (pid, query)."""
    with admin() as conn:
        return conn.execute(
            "SELECT pid, query FROM pg_stat_activity "
            "WHERE %s = ANY(pg_blocking_pids(pid))",
            (blocker_pid,),
        ).fetchall()


def nobody_left_waiting(admin: Admin, blocker_pid: int) -> None:
    """Wait until statements given up behind ``blocker_pid`` were cancelled."""
    wait_until(
        lambda: not waiting_behind(admin, blocker_pid),
        "the statements given up to be cancelled on the server",
        timeout_s=CANCELLED_WITHIN_S,
    )


@pytest.fixture(scope="session")
def store_schema(pg_dsn: str, pg_admin: Admin) -> Iterator[str]:
    """A schema of the suite's own, with leaderrun's tables, for every lock."""
    name = new_name("lr_stores")
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    PostgresLeaseStore(pg_dsn, name).init()
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def _backend(kind: str, request: pytest.FixtureRequest, real_clock: bool) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        directory = request.getfixturevalue("tmp_path")
        return SqliteBackend(directory, real_clock=real_clock)
    return PostgresBackend(
        request.getfixturevalue("pg_dsn"),
        request.getfixturevalue("store_schema"),
        request.getfixturevalue("pg_admin"),
    )


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.pg)]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each kind of store in turn, on moved clocks where they can be moved."""
    chosen = _backend(request.param, request, real_clock=False)
    yield chosen
    chosen.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def sql_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each SQL store in turn, with its tables, on the real clocks (as the command
    line's)."""
    chosen = _backend(request.param, request, real_clock=True)
    chosen.store.init()
    yield chosen
    chosen.close()


@pytest.fixture
def pg_backend(pg_dsn: str, store_schema: str, pg_admin: Admin) -> Iterator[Backend]:
    """The PostgreSQL store alone, for what only it has."""
    chosen = PostgresBackend(pg_dsn, store_schema, pg_admin)
    yield chosen
    chosen.close()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[SqliteBackend]:
    """The SQLite store alone, on the real clocks, for what only it has."""
    chosen = SqliteBackend(tmp_path, real_clock=True)
    yield chosen
    chosen.close()


@pytest.fixture
def lock(lock_name: str) -> LockId:
    """A lock no other test uses (``lock_name``, parsed)."""
    return parse_lock_id(lock_name)
