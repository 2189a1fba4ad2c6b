"""What the two SQL stores share: a session that speaks to its dialect in query names.

:class:`SqlSession` does everything PostgreSQL and SQLite do alike: the
parameters, creating a missing table, decoding results by column name, giving
back a grant whose answer was lost, the operators' release, the bounded-call
plumbing. It names its queries (:data:`QUERIES`), as procrastinate's manager
does; each dialect keeps only their text (PostgreSQL's single statements,
SQLite's ``BEGIN IMMEDIATE`` transactions), its connection and its error
mapping.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from leaderrun.bounded import CallTimedOut, call_bounded
from leaderrun.errors import (
    DatabaseUnavailableError,
    ForeignTableError,
    InvariantError,
    SchemaMissingError,
    StatementTimeoutError,
)
from leaderrun.lease import Lease, LockId
from leaderrun.runs import RunEnd, RunOutcome, RunRecord
from leaderrun.stores.base import (
    FLAG_LABELS,
    MAX_COMMAND_CHARS,
    REVOKED_HOLDER,
    AcquireResult,
    Claim,
    InitOutcome,
    LeaseRecord,
    LeaseSnapshot,
    ManagedStore,
    ReleaseResult,
    Row,
    RunOutput,
    acquire_result,
    from_row,
    release_outcome,
)

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")
_S = TypeVar("_S", bound="SqlSession")

QUERIES = (
    "acquire",
    "renew",
    "release",
    "snapshot",
    "operator_release",
    "history",
    "last_runs",
    "run_output",
)

if TYPE_CHECKING:
    from leaderrun.slots import OncePer
"""The queries each SQL dialect names and runs (:meth:`SqlSession._query`).

What each returns, by column name:

- ``acquire``: no row (someone took the lock in between), or one row with
  ``acquired``, ``token`` and ``slot_known``; a refused one also has
  ``holder``, ``host``, ``pid``, ``expires_in_s``, ``lock_name``,
  ``window_start`` (the current slot, with ``once_per``) and ``window_done``.
  ``slot_known`` false (nothing taken) asks for a slot table built around
  ``db_now_s``, the store's now in epoch seconds. A dialect with a ``--wait``
  queue adds ``turn_in_s``, and may refuse with ``token`` NULL (no lease row
  yet, but a waiter ahead); PostgreSQL adds ``synchronous_commit``.
- ``renew``, ``release``: one row if the lease was ours, else none.
- ``snapshot``: at least one row, each with ``db_now``; a row of the lease
  table has its columns and ``acquired_at``, ``renewed_at``, ``expires_at``;
  the one row of an empty result has ``lock_key`` NULL.
- ``operator_release``: the row it changed, as ``snapshot`` has it, or none.
- ``history``, ``last_runs``: rows with :class:`~leaderrun.runs.RunRecord`'s
  fields.
- ``run_output``: the newest run of the lock (or the one with ``token``), as
  ``token`` and ``output``; none if there is no such run.
"""

_LEASE_RECORD_COLUMNS = {"key": "lock_key", "name": "lock_name"}
"""The lease table's column behind each :class:`LeaseRecord` field of another name."""

_DDL_COLUMN = re.compile(r"^\s+([a-z_][a-z0-9_]*)\s+[A-Za-z]", re.MULTILINE)


def columns_of(ddl: str) -> tuple[str, ...]:
    """The columns that one of our ``CREATE TABLE`` statements declares, in order.

    Our DDL puts one column a line, its name in lower case; table constraints
    (``PRIMARY KEY (...)``) are in upper case, and so are not columns.
    """
    return tuple(_DDL_COLUMN.findall(ddl))


def lease_params(lease: Lease) -> dict[str, Any]:
    """The parameters that name one lease: its lock, holder and token."""
    return {"key": lease.lock.key, "holder": lease.holder, "token": lease.token}


class SqlStore(ManagedStore, Generic[_S]):
    """What the two SQL stores share: sessions made alike, and the grants answered.

    Args:
        create: create the tables on first use if they are missing.
        bound_s: how long any call may take before it is given up
            (``bounded-statements``).
        labels: how messages name ``lock_id``, ``dsn`` and ``schema``: the
            library's parameter names; by default the command line's flags.
    """

    def __init__(
        self,
        *,
        create: bool,
        bound_s: float,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.labels: Mapping[str, str] = {**FLAG_LABELS, **(labels or {})}
        """How messages name the settings (``--schema``, or ``schema``)."""
        self.create = create
        self.bound_s = bound_s
        """How long any call may take before it is given up and interrupted."""
        # (lock key, holder) -> the last token that holder was granted and told.
        self._answered_tokens: dict[tuple[int, str], int] = {}

    @abstractmethod
    def session(self) -> _S:
        """A new session, not yet prepared for leases."""

    def connect(self) -> _S:
        """Open a session and prepare it for leases (:meth:`SqlSession.prepare`).

        Raises:
            DatabaseUnavailableError: the database cannot be reached or used.
        """
        session = self.session()
        try:
            session.prepare()
        except BaseException:
            session.close()
            raise
        return session

    def init(self) -> InitOutcome:
        """Create leaderrun's tables if missing, or upgrade older ones of its own.

        Raises:
            DatabaseUnavailableError: the store cannot be used, or a table in
                leaderrun's place is not leaderrun's.
        """
        with contextlib.closing(self.session()) as session:
            return session.init()

    def answered(self, lock: LockId, holder: str, token: int) -> None:
        """Record that ``holder`` was granted ``lock`` with ``token``, and knows it."""
        self._answered_tokens[lock.key, holder] = token

    def unanswered(self, lock: LockId, holder: str, row: Row) -> bool:
        """Whether an acquire's refusal shows a grant to ``holder`` it never saw.

        Holder identities are unique per process start (``unique-holder``), and
        every grant takes a larger token: a lease held by ``holder`` with a
        token above the last one it was answered comes from an acquire whose
        answer was lost (given up, then committed after all). Nobody works
        under it. A token it was answered is a term of its own (a library's,
        lost by its deadline): that one runs out as it should.
        """
        known = self._answered_tokens.get((lock.key, holder), 0)
        return (
            not row["acquired"]
            and row["holder"] == holder
            and row["lock_name"] == lock.name
            and int(row["token"]) > known
        )


class SqlSession(ABC):
    """A session of a SQL store: all that the two dialects do alike.

    The dialect runs the named queries of :data:`QUERIES` (:meth:`_query`), opens
    and closes its connection, maps its driver's errors and says how a time
    comes back (:meth:`_to_datetime`); everything else is here.

    Every call is bounded (``bounded-statements``): it runs on a worker thread
    (:func:`leaderrun.bounded.call_bounded`) for at most the store's
    :attr:`~SqlStore.bound_s`. One given up (the bound passed, or a signal
    handler raised in the waiting thread) leaves the session dead: every later
    call raises :class:`~leaderrun.errors.DatabaseUnavailableError`, and the
    connection is closed by whoever touches it last, never from under a
    running statement.
    """

    _thread_name = "leaderrun-statement"
    """The name of the worker threads that run this dialect's calls."""

    def __init__(self, store: SqlStore[Any]) -> None:
        self._store = store
        self._abandoned = False

    # --- the lease statements --------------------------------------------------------

    def acquire(
        self,
        lock: LockId,
        claim: Claim,
        lease_s: float,
        *,
        once_per: OncePer | None = None,
        history_keep: int | None = None,
        queued: bool = False,
    ) -> AcquireResult:
        """Take the lock if free or expired; else describe its holder.

        With ``once_per``, refuse when the store's current window already ran;
        with ``history_keep``, record the run, close the runs of dead holders
        as lost and prune the lock's history to that many runs, at once.
        ``queued``: take a place in the ``--wait`` queue, where the dialect
        keeps one (PostgreSQL; SQLite serves waiters in no particular order).

        Raises:
            ConfigError: the lock's key is taken by a lock of another name.
            SchemaMissingError: no table, and it cannot be created; or a table
                of an older version, which only ``init`` upgrades.
            StatementTimeoutError: the call did not finish within its bound.
            DatabaseUnavailableError: the call could not run.
        """
        params = {
            **self._acquire_params(lock, claim, lease_s, once_per, history_keep),
            **self._queue_params(claim, lease_s, queued),
        }
        row = self._acquire_row(lock, params)
        if row is not None and not row["slot_known"] and once_per is not None:
            # Our clock is far from the store's: place the slot by its now.
            slots = self._slot_params(once_per, float(row["db_now_s"]))
            row = self._acquire_row(lock, {**params, **slots})
            if row is not None and not row["slot_known"]:
                raise DatabaseUnavailableError(
                    f"could not tell which slot of {once_per.flags()} the "
                    f"database's now falls in, while acquiring {lock}; try again"
                )
        if row is not None and self._store.unanswered(lock, claim.holder, row):
            # Ours, yet never answered: an earlier acquire of this claim was
            # given up (a frozen server, a partition; its cancel never arrived)
            # and committed after all. Nobody runs under that token: give it
            # back rather than keep everyone out, us too, until it expires.
            unused = Lease(lock, claim.holder, int(row["token"]))
            never_ran = RunEnd(RunOutcome.lost, None, started=False)
            self.release(unused, never_ran)
            log.warning(
                "gave back %s's fencing token %d: an acquire of ours was granted "
                "it, but its answer never came",
                lock,
                unused.token,
            )
            row = self._acquire_row(lock, params)
        result = acquire_result(
            lock, claim, row, self._to_datetime, self._store.labels["lock_id"]
        )
        if result.lease is not None:
            self._store.answered(lock, claim.holder, result.lease.token)
        return result

    def leave_queue(self, lock: LockId, claim: Claim) -> None:
        """Give up ``claim``'s place in the ``--wait`` queue (if the dialect keeps one).

        The next in line is woken if the lock is free: it would otherwise
        sleep until this place lapsed. A dialect without a queue has nothing
        to leave.
        """
        return None

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease by ``lease_s`` from the store's now; False if lost."""
        params = {**lease_params(lease), "lease_s": lease_s}
        return len(self._query("renew", params, lease.lock)) == 1

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row; False if it was no longer ours.

        With ``end``, close the run in the history (even when the lease is no
        longer ours), hold the lease until ``acquired_at + end.min_hold_s``, and
        record for ``--retry-failed`` whether a window's run ended well.
        """
        params = self._release_params(lease, end)
        return len(self._query("release", params, lease.lock)) == 1

    # --- the operators' queries ------------------------------------------------------

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Rows of the lease table (all, or ``lock``'s) with the store's now."""
        params = {"key": None if lock is None else lock.key}
        rows = self._query("snapshot", params, lock)
        records = tuple(
            self._lease_record(row) for row in rows if row["lock_key"] is not None
        )
        return LeaseSnapshot(self._to_datetime(rows[0]["db_now"]), records)

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

        def update() -> LeaseSnapshot | None:
            rows = self._query("operator_release", params, lock)
            if not rows:
                return None
            db_now = self._to_datetime(rows[0]["db_now"])
            return LeaseSnapshot(db_now, (self._lease_record(rows[0]),))

        return release_outcome(lock, token, update, lambda: self.snapshot(lock))

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, of one lock or of all, newest first."""
        params = {"key": None if lock is None else lock.key, "limit": limit}
        return self._runs("history", params, lock)

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        return self._runs("last_runs", {}, None)

    def run_output(self, lock: LockId, token: int | None) -> RunOutput | None:
        """The captured output of the lock's newest run, or of run ``token``."""
        params = {"key": lock.key, "token": token}
        rows = self._query("run_output", params, lock)
        return RunOutput(int(rows[0]["token"]), rows[0]["output"]) if rows else None

    def close(self) -> None:
        """Close the connection; never raises.

        A session given up with a call still running is closed by that call's
        thread, once it returns.
        """
        if not self._abandoned:
            self._close_connection()

    # --- what the dialect provides ---------------------------------------------------

    @abstractmethod
    def prepare(self) -> None:
        """Make a new session ready for leases (checks, file format, creation)."""

    @abstractmethod
    def init(self) -> InitOutcome:
        """``leaderrun init``: create the tables, upgrade older ones, or leave them."""

    @abstractmethod
    def _query(
        self, name: str, params: Mapping[str, Any], lock: LockId | None
    ) -> list[Row]:
        """Run the query ``name`` of :data:`QUERIES` on ``lock``, bounded.

        ``lock`` only names it in messages. Errors are leaderrun's.
        """

    @abstractmethod
    def _to_datetime(self, value: Any) -> datetime:
        """A time as the dialect returns it, as an aware datetime."""

    @abstractmethod
    def _create_missing(self) -> bool:
        """Create leaderrun's missing tables; True if the failed call is worth a retry.

        False, having changed nothing, when the tables that are there are not
        this version's own: the failed call's error says so.
        """

    @abstractmethod
    def _has_run_table(self) -> bool:
        """Whether the run history table is there (a missing one: nothing recorded)."""

    @abstractmethod
    def _transaction_left_open(self) -> str | None:
        """The transaction state the connection was left in, or None when idle."""

    @abstractmethod
    def _interrupt(self) -> None:
        """Ask the statement running on the connection to stop; never blocks."""

    @abstractmethod
    def _close_connection(self) -> None:
        """Close the connection now (no statement runs on it); never raises."""

    @abstractmethod
    def _stuck(self, what: str, bound_s: float) -> str:
        """The message for ``what``, given up after ``bound_s``."""

    @abstractmethod
    def _given_up(self, what: str) -> str:
        """The message for ``what``, refused on a session given up before."""

    # --- what both do alike ----------------------------------------------------------

    def _acquire_params(
        self,
        lock: LockId,
        claim: Claim,
        lease_s: float,
        once_per: OncePer | None,
        history_keep: int | None,
    ) -> dict[str, Any]:
        """The acquire query's parameters."""
        return {
            "key": lock.key,
            "name": lock.name,
            "holder": claim.holder,
            "lease_s": lease_s,
            "host": claim.host,
            "pid": claim.pid,
            "command": claim.command[:MAX_COMMAND_CHARS],
            "once_per": once_per,
            "cadence": None if once_per is None else once_per.describe(),
            "retry_failed": once_per is not None and once_per.retry_failed,
            "keep": history_keep,
            **self._slot_params(once_per, None),
        }

    def _queue_params(
        self, claim: Claim, lease_s: float, queued: bool
    ) -> dict[str, Any]:
        """The acquire's parameters for the ``--wait`` queue, if the dialect has one."""
        return {}

    def _slot_params(
        self, once_per: OncePer | None, db_now_s: float | None
    ) -> dict[str, Any]:
        """The acquire's parameters that place its slot, if the dialect needs them.

        ``db_now_s`` is the store's now when known (after an acquire said its
        table missed it); None means the store is guessed to be near our clock.
        SQLite reads the cadence itself (``once_per``) by its own clock.
        """
        return {}

    def _release_params(self, lease: Lease, end: RunEnd | None) -> dict[str, Any]:
        """The release query's parameters."""
        return {
            **lease_params(lease),
            "outcome": None if end is None else str(end.outcome),
            "exit_status": None if end is None else end.exit_status,
            "min_hold_s": 0.0 if end is None else end.min_hold_s,
            "window_ok": None if end is None else end.window_ok,
            "started": end is None or end.started,
            "output": None if end is None else end.output,
        }

    def _acquire_row(self, lock: LockId, params: Mapping[str, Any]) -> Row | None:
        """The acquire query's row, creating missing tables first if allowed."""
        try:
            rows = self._query("acquire", params, lock)
        except ForeignTableError:
            raise
        except SchemaMissingError:
            if not self._store.create or not self._create_missing():
                raise
            rows = self._query("acquire", params, lock)
        return rows[0] if rows else None

    def _runs(
        self, name: str, params: Mapping[str, Any], lock: LockId | None
    ) -> list[RunRecord]:
        try:
            rows = self._query(name, params, lock)
        except ForeignTableError:
            raise
        except SchemaMissingError:
            if self._has_run_table():
                raise  # a missing column: an older table that init upgrades
            return []  # nothing was ever recorded here
        return [from_row(RunRecord, row, self._to_datetime) for row in rows]

    def _lease_record(self, row: Row) -> LeaseRecord:
        return from_row(LeaseRecord, row, self._to_datetime, _LEASE_RECORD_COLUMNS)

    def _time(self, value: Any) -> datetime | None:
        return None if value is None else self._to_datetime(value)

    def _check_idle(self) -> None:
        # A statement left inside a transaction would freeze now() (PostgreSQL)
        # or keep the file's write lock (SQLite) and hide the write from everyone
        # else (``no-session-state``): fail loudly, never silently.
        state = self._transaction_left_open()
        if state is not None:
            raise InvariantError(
                f"the connection to {self._store.describe()} was left in a "
                f"transaction ({state})"
            )

    def _bounded(self, what: str, work: Callable[[], _T]) -> _T:
        """Run ``work`` on a worker thread, within the store's bound.

        ``what`` names the call in errors. The caller's thread only waits (a
        signal handler may raise there); given up, the call is interrupted,
        the session is dead, and the connection closes once the call returned.
        ``work``'s own errors are raised as they are.

        Raises:
            StatementTimeoutError: the bound passed first.
            DatabaseUnavailableError: the session was given up before.
        """
        if self._abandoned:
            raise DatabaseUnavailableError(self._given_up(what))

        def interrupt() -> None:
            self._abandoned = True
            self._interrupt()

        def cleanup() -> None:
            self._abandoned = True
            self._close_connection()

        try:
            return call_bounded(
                work,
                self._store.bound_s,
                interrupt=interrupt,
                cleanup=cleanup,
                name=self._thread_name,
            )
        except CallTimedOut as exc:
            raise StatementTimeoutError(self._stuck(what, exc.bound_s)) from None
