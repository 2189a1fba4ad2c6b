"""Fixtures that start the real ``leaderrun`` command as subprocesses.

Every process a test starts is killed at teardown, whatever happened, so a
failing test cannot leave a child holding a lock for the next one.

A test that uses ``leaderrun`` (or ``store_kind``) runs once per lease store:
``[postgres]`` on the session's PostgreSQL, ``[sqlite]`` on a SQLite file of its
own. ``@pytest.mark.stores("postgres")`` keeps a test to the stores it names,
for faults that only one of them has. ``lease_admin`` reads and tampers with
the lease row on either store, as an operator would.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from psycopg.rows import TupleRow

from leaderrun.clock import boottime
from leaderrun.stores.host import BOOT_ID
from tests.helpers.command import run as leaderrun_cli
from tests.helpers.processes import pid_gone

CHILD = str(Path(__file__).parent.parent / "helpers" / "child.py")
"""The handshake child: ``ready <pid>``, then one line per signal."""

FAST = ("--lease-duration", "4s")
"""A lease short enough for tests: renew every 0.67 s, kill deadline 2.3 s."""

READ_TIMEOUT_S = 15.0


def child(*args: str) -> list[str]:
    """The argv of the handshake child."""
    return [sys.executable, CHILD, *args]


# Keyed by id(), and holding the stream so that its id cannot be reused while
# the entry exists; Leaderrun.kill_all() drops the entries of closed streams.
_readers: dict[int, tuple[IO[str], queue.Queue[str]]] = {}


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """A queue fed with the stream's lines by a thread ('' at EOF).

    select() cannot be used on a buffered text stream: one read may pull in two
    lines, and select would then wait for data that is already in the buffer.
    """
    key = id(stream)
    if key not in _readers:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in iter(stream.readline, ""):
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        _readers[key] = (stream, lines)
    return _readers[key][1]


def readline(stream: IO[str], timeout_s: float = READ_TIMEOUT_S) -> str:
    """One line from a pipe, or fail after ``timeout_s``: never hang on a dead child."""
    try:
        return _lines(stream).get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"no line within {timeout_s}s")


def read_rest(stream: IO[str], timeout_s: float = READ_TIMEOUT_S) -> str:
    """Everything up to EOF (through the same queue as :func:`readline`)."""
    chunks = []
    while line := readline(stream, timeout_s):
        chunks.append(line)
    return "".join(chunks)


def wait_for_line(stream, needle: str, timeout_s: float = READ_TIMEOUT_S) -> list[str]:
    """Read lines until one contains ``needle``; return them all."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = readline(stream, max(0.01, deadline - time.monotonic()))
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    pytest.fail(f"{needle!r} not seen; got {lines!r}")


def wait_gone(pid: int, timeout_s: float) -> float:
    """Wait until ``pid`` is gone; return how long it took, or fail."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pid_gone(pid):
            return time.monotonic() - start
        time.sleep(0.005)
    pytest.fail(f"pid {pid} still alive after {timeout_s}s")


class Leaderrun:
    """Starts ``python -m leaderrun`` with the test database and lock."""

    def __init__(self, dsn: str, lock: str) -> None:
        self.dsn = dsn
        self.lock = lock
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *args: str, lock: str | None = None) -> list[str]:
        """The full command line: leaderrun, the DSN and lock, then ``args``."""
        return [
            sys.executable,
            "-m",
            "leaderrun",
            "--dsn",
            self.dsn,
            "--lock-id",
            lock or self.lock,
            *args,
        ]

    def start(
        self, *args: str, env: dict[str, str] | None = None, **kw
    ) -> subprocess.Popen[str]:
        """Start leaderrun with pipes for stdout and stderr."""
        proc = subprocess.Popen(
            self.argv(*args),
            stdout=kw.pop("stdout", subprocess.PIPE),
            stderr=kw.pop("stderr", subprocess.PIPE),
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            text=True,
            env={**os.environ, **(env or {})},
            **kw,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout_s: float = 60, **kw
    ) -> subprocess.CompletedProcess[str]:
        """Run leaderrun to completion."""
        proc = self.start(*args, **kw)
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def operator(self, subcommand: str, *args: str) -> subprocess.CompletedProcess[str]:
        """An operator's subcommand (status, history, release) on this lock."""
        return leaderrun_cli(
            subcommand, "--dsn", self.dsn, "--lock-id", self.lock, *args
        )

    def kill_all(self) -> None:
        """SIGKILL every leaderrun started here, and everything below it."""
        for proc in self.procs:
            if proc.poll() is None:
                # Grandchildren do not get the parent-death signal and would
                # keep the pipes open: kill the whole tree, leaves first.
                for pid in reversed(descendants(proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    _readers.pop(id(stream), None)
                    stream.close()


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
        for child_pid in children:
            found.append(child_pid)
            found.extend(descendants(child_pid))
    return found


STORES = ("postgres", "sqlite")
"""Every lease store the behavioural tests run against."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that needs a store once per store (those its mark allows)."""
    if "store_kind" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("stores")
    kinds = marker.args if marker is not None else STORES
    unknown = set(kinds) - set(STORES)
    if unknown:
        raise pytest.UsageError(f"unknown stores {sorted(unknown)}; use {STORES}")
    metafunc.parametrize(
        "store_kind",
        [
            # Only the PostgreSQL run needs the server: mark it, so that
            # -m "not pg" still runs the SQLite half.
            pytest.param(kind, marks=pytest.mark.pg if kind == "postgres" else ())
            for kind in kinds
        ],
    )


@pytest.fixture
def store_dsn(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The DSN of this test's store: the session's PostgreSQL, or a fresh file."""
    if store_kind == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    return f"sqlite://{tmp_path}/leases.db"


@pytest.fixture
def leaderrun(store_dsn: str, lock_name: str) -> Iterator[Leaderrun]:
    """A factory of leaderrun processes on this test's own lock and store."""
    runner = Leaderrun(store_dsn, lock_name)
    yield runner
    runner.kill_all()


class LeaseAdmin:
    """An operator's SQL on the lease row, spelled for the store under test."""

    def __init__(
        self,
        store_kind: str,
        store_dsn: str,
        pg_admin: Callable[[], psycopg.Connection[TupleRow]] | None,
    ) -> None:
        self.store_kind = store_kind
        self.store_dsn = store_dsn
        self.pg_admin = pg_admin

    def sqlite(self) -> sqlite3.Connection:
        """An autocommit connection to the SQLite file (sqlite only)."""
        path = self.store_dsn.removeprefix("sqlite://")
        return sqlite3.connect(path, isolation_level=None, timeout=READ_TIMEOUT_S)

    def _one(
        self, postgres: str, sqlite: str, lock: str, *before: Any
    ) -> tuple[Any, ...]:
        """The one row a statement returns, on the store under test.

        ``postgres`` and ``sqlite`` are the same statement in each dialect, with
        ``before`` then the lock's name as their parameters; the row must exist.
        """
        if self.pg_admin is not None:
            with self.pg_admin() as conn:
                found = conn.execute(postgres, (*before, lock)).fetchone()
        else:
            with contextlib.closing(self.sqlite()) as conn:
                # fetchall: an UPDATE commits only once RETURNING is read to the end.
                rows = conn.execute(sqlite, (*before, lock)).fetchall()
            found = rows[0] if len(rows) == 1 else None
        assert found is not None, f"no row for {lock}"
        return tuple(found)

    def _expiry(self, found: tuple[Any, ...]) -> datetime:
        """The expiry a row gave: a timestamp, or SQLite's boot id and boot seconds."""
        if self.pg_admin is not None:
            expires_at: datetime = found[0]
            return expires_at
        return sqlite_expiry(found[0], found[1])

    def row(self, lock: str) -> tuple[str | None, int, bool]:
        """(holder, token, whether the lease has ended) of the lock's row."""
        holder, token, *expiry = self._one(
            "SELECT holder, token, expires_at FROM leader_lease WHERE lock_name = %s",
            "SELECT holder, token, boot_id, expires_boot_s FROM leader_lease"
            " WHERE lock_name = ?",
            lock,
        )
        return holder, token, self._expiry(tuple(expiry)) <= _now()

    def expires_at(self, lock: str) -> datetime:
        """When the lock's lease ends, in UTC, as the store has it."""
        return self._expiry(
            self._one(
                "SELECT expires_at FROM leader_lease WHERE lock_name = %s",
                "SELECT boot_id, expires_boot_s FROM leader_lease WHERE lock_name = ?",
                lock,
            )
        )

    def runs_recorded(self, lock: str) -> int:
        """How many rows the run history keeps for the lock."""
        (count,) = self._one(
            "SELECT count(*) FROM leader_run WHERE lock_name = %s",
            "SELECT count(*) FROM leader_run WHERE lock_name = ?",
            lock,
        )
        return int(count)

    def set_slot(self, lock: str, start_s: float) -> None:
        """Record ``start_s`` as the slot of the lock's last run, as if it ran then."""
        self._one(
            "UPDATE leader_lease SET window_start = to_timestamp(%s)"
            " WHERE lock_name = %s RETURNING token",
            "UPDATE leader_lease SET window_start = ? WHERE lock_name = ?"
            " RETURNING token",
            lock,
            start_s,
        )

    def insert_free(self, lock: str) -> None:
        """A free lock's row written by hand, named ``lock`` (a newline, say)."""
        key = abs(hash(lock)) % 2**62
        self._one(
            "INSERT INTO leader_lease (lock_key, lock_name, token, acquired_at,"
            " renewed_at, expires_at) VALUES (%s, %s, 1, now(), now(), now())"
            " RETURNING token",
            "INSERT INTO leader_lease (lock_key, lock_name, token, boot_id,"
            " acquired_boot_s, expires_boot_s, acquired_unix_s, renewed_unix_s)"
            " VALUES (?, ?, 1, NULL, 0, 0, 0, 0) RETURNING token",
            lock,
            key,
        )

    def age_run(self, lock: str, seconds: float) -> None:
        """Move the lock's one run (its slot and times) ``seconds`` into the past."""
        self._one(
            "UPDATE leader_run"
            " SET window_start = window_start - make_interval(secs => %s),"
            " started_at = started_at - make_interval(secs => %s),"
            " finished_at = finished_at - make_interval(secs => %s)"
            " WHERE lock_name = %s RETURNING token",
            "UPDATE leader_run SET window_start = window_start - ?,"
            " started_at = started_at - ?, finished_at = finished_at - ?"
            " WHERE lock_name = ? RETURNING token",
            lock,
            seconds,
            seconds,
            seconds,
        )

    def take_over(self, lock: str) -> datetime:
        """Give the lock to 'thief' with a new token; the expiry it had, in UTC."""
        return self._expiry(
            self._one(
                "UPDATE leader_lease SET holder = 'thief', token = token + 1"
                " WHERE lock_name = %s RETURNING expires_at",
                "UPDATE leader_lease SET holder = 'thief', token = token + 1"
                " WHERE lock_name = ? RETURNING boot_id, expires_boot_s",
                lock,
            )
        )


def _now() -> datetime:
    return datetime.now(UTC)


def this_boot() -> str:
    """The boot id SQLite lease rows of this boot carry."""
    return Path(BOOT_ID).read_text().strip()


def sqlite_expiry(boot_id: str | None, expires_boot_s: float) -> datetime:
    """When a SQLite lease ends, on the wall clock: its boot-clock expiry from now.

    A lease of another boot has ended already (now is returned, as a bound).
    """
    if boot_id != this_boot():
        return _now()
    return _now() + timedelta(seconds=expires_boot_s - boottime())


@pytest.fixture
def lease_admin(
    store_kind: str, store_dsn: str, request: pytest.FixtureRequest
) -> LeaseAdmin:
    """Reads and changes the lease row of the store under test."""
    pg_admin = request.getfixturevalue("pg_admin") if store_kind == "postgres" else None
    return LeaseAdmin(store_kind, store_dsn, pg_admin)
