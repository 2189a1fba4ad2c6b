"""The lease store's contract: its protocols and records, free of any driver.

A store hands out sessions; each session is one connection, used by one thread
at a time. Three stores keep this contract: PostgreSQL for a fleet
(:mod:`leaderrun.stores.postgres`, the only module that runs psycopg), SQLite
for the processes of one host (:mod:`leaderrun.stores.sqlite`, the only one
that imports sqlite3), and memory, for tests (:mod:`leaderrun.stores.memory`).
The two SQL stores share their session (:mod:`leaderrun.stores.sql`). The
contract suite (``tests/contract``) runs the same tests on all three.

The lease side (:class:`LeaseStore`, :class:`LeaseSession`) is what the runner
and the library need; the operators' side (:class:`ManagedStore`,
:class:`OperatorSession`) adds status, release, history and ``init``.
"""

from __future__ import annotations

import contextlib
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from leaderrun.errors import ConfigError, DatabaseUnavailableError
from leaderrun.lease import Lease, LockId
from leaderrun.runs import RunEnd, RunRecord

if TYPE_CHECKING:
    from leaderrun.slots import OncePer

TABLE = "leader_lease"
"""The lease table's name (the seed's), in every store."""

RUN_TABLE = "leader_run"
"""The run history table's name, in every store."""

MAX_COMMAND_CHARS = 1000
"""The command shown in ``status`` is cut to this many characters."""


Row = Mapping[str, Any]
"""One row of a store's table or query, by column name."""


FLAG_LABELS: Mapping[str, str] = {
    "lock_id": "--lock-id",
    "dsn": "--dsn",
    "schema": "--schema",
}
"""How a store's messages name its settings by default: the command line's flags.
The library passes its parameter names instead (``elector.PARAMETERS``)."""


def key_collision(
    lock: LockId, other_name: str | None, label: str = FLAG_LABELS["lock_id"]
) -> ConfigError:
    """The error for a lock whose 64-bit key a lock of another name already uses.

    Names hash to keys, so two names can collide; the row's name decides, and
    the newcomer is told to rename rather than silently sharing the lock.
    """
    other = other_name if other_name is not None else lock.key
    return ConfigError(
        f"{label} {str(lock)!r} has the same 64-bit key as the lock "
        f"{other!r}; choose another name"
    )


@dataclass(frozen=True)
class Claim:
    """Who asks for a lock: the holder identity and what is shown in ``status``."""

    holder: str
    host: str
    pid: int
    command: str


@dataclass(frozen=True)
class AcquireResult:
    """The outcome of one acquire statement.

    Either ``lease`` is set (we hold the lock now), or it is None and the other
    fields describe the current holder as the database saw it.
    """

    lease: Lease | None
    holder: str | None = None
    holder_host: str | None = None
    holder_pid: int | None = None
    expires_in_s: float | None = None
    """Seconds until the current holder's lease ends, in database time."""
    window_start: datetime | None = None
    """With ``once_per``: the current slot's start, in database time."""
    window_done: bool = False
    """With ``once_per``: refused because the current slot already ran."""
    turn_in_s: float | None = None
    """Queued (``--wait``): seconds until the place ahead of ours lapses.

    Set when another waiter is ahead in the fair queue: our turn comes when
    the lock is released to it and it is done, or when its place lapses.
    """


def acquire_result(
    lock: LockId,
    claim: Claim,
    row: Row | None,
    to_datetime: Callable[[Any], datetime],
    lock_label: str = FLAG_LABELS["lock_id"],
) -> AcquireResult:
    """What one acquire decided, from its row (``acquire`` in ``sql.QUERIES``).

    No row: someone took the lock just before. A refused row whose lock name is
    not ``lock``'s is another lock on the same key: refused for good.

    Raises:
        ConfigError: ``lock``'s key is another lock name's.
    """
    if row is None:
        return AcquireResult(lease=None)
    window = row["window_start"]
    window_start = None if window is None else to_datetime(window)
    if row["acquired"]:
        lease = Lease(lock, claim.holder, int(row["token"]))
        return AcquireResult(lease=lease, window_start=window_start)
    turn_in_s = row.get("turn_in_s")
    if row["token"] is None:  # no lease row yet: refused by the queue alone
        return AcquireResult(lease=None, window_start=window_start, turn_in_s=turn_in_s)
    if row["lock_name"] != lock.name:
        raise key_collision(lock, row["lock_name"], lock_label)
    return AcquireResult(
        lease=None,
        holder=row["holder"],
        holder_host=row["host"],
        holder_pid=row["pid"],
        expires_in_s=row["expires_in_s"],
        window_start=window_start,
        window_done=bool(row["window_done"]),
        turn_in_s=turn_in_s,
    )


class LeaseSession(Protocol):
    """One connection to the store; every method is a single statement.

    Methods raise :class:`leaderrun.errors.DatabaseUnavailableError` (or a
    subclass) when the statement cannot be run; such a failure says nothing about
    the lease, and the caller may retry on a fresh session.
    """

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
        """Take the lock if it is free or expired, bumping the fencing token.

        With ``once_per``, also refuse when the current slot (of database
        time) already had a start, and record the cadence in the row. With
        ``history_keep``, record the run in the history, close the runs of
        holders that died as ``lost``, and keep at most that many runs of the
        lock; all in the same statement. ``queued`` (``--wait``): serve
        waiters in arrival order where the store keeps a queue (PostgreSQL),
        keeping this claim's place in it when refused.
        """
        ...

    def leave_queue(self, lock: LockId, claim: Claim) -> None:
        """Give up this claim's place in the ``--wait`` queue, if it has one."""
        ...

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease; False means it is definitely lost (taken or ended)."""
        ...

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now; False means it was no longer ours.

        With ``end``, also close the run in the history, and keep the lease
        taken until ``acquired_at + end.min_hold_s`` in database time.
        """
        ...

    def close(self) -> None:
        """Close the connection; never raises."""
        ...


class LeaseStore(Protocol):
    """A place where leases live, able to open sessions."""

    def connect(self) -> LeaseSession:
        """Open a session.

        Raises:
            DatabaseUnavailableError: the database cannot be reached or used.
        """
        ...

    def describe(self) -> str:
        """Where the store is, for messages; never includes a password."""
        ...


class InitOutcome(StrEnum):
    """What ``leaderrun init`` did to the store's tables."""

    created = "created"
    """The lease table did not exist: leaderrun's tables were created."""
    upgraded = "upgraded"
    """They were made by an older leaderrun and were brought up to date."""
    current = "current"
    """They were there and up to date: nothing changed."""


# --- the operators' view: status and release (``leaderrun.views`` renders it) ---

REVOKED_HOLDER = "(revoked)"
"""The holder of a lease ended by ``release --force`` until it runs out.

It can never be a real holder (those are ``host:pid:nonce``), so the old
holder's next renewal, a compare-and-swap on holder and token, finds nothing,
and no contender may take the lock before the revoked lease's ``expires_at``:
by then the old holder has stopped its child, renewal or no renewal.
"""


@dataclass(frozen=True)
class LeaseRecord:
    """One row of the lease table, with the database's ``now()`` when it was read."""

    key: int
    name: str | None
    holder: str | None
    token: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    host: str | None
    pid: int | None
    command: str | None
    cadence: str | None = None
    """The cadence of the lock's last ``--once-per``/``--schedule`` run, as JSON
    (:meth:`leaderrun.slots.OncePer.describe`); None if it never had one."""
    runs_ok: int = 0
    """Runs of the lock that ended with status 0, ever (kept through pruning)."""
    runs_failed: int = 0
    """Runs that ended with a non-zero status (or could not start), ever."""
    runs_killed: int = 0
    """Runs that died of a signal leaderrun did not send for a deadline, ever."""
    runs_timeout: int = 0
    """Runs stopped at ``--max-runtime``, ever."""
    runs_lost: int = 0
    """Runs whose lease was lost or whose holder died, ever."""
    last_ok_at: datetime | None = None
    """When the lock's last run that ended with status 0 ended."""


@dataclass(frozen=True)
class LeaseSnapshot:
    """Rows of the lease table and the database's ``now()``, read in one statement."""

    db_now: datetime
    records: tuple[LeaseRecord, ...]


class ReleaseAction(StrEnum):
    """What ``release`` did, decided by one conditional UPDATE."""

    freed = "freed"
    """An expired lease (or a revoked one that ran out) was cleared."""
    revoked = "revoked"
    """A live lease was revoked (``--force``); free once it runs out."""
    refused = "refused"
    """A live lease, and no ``--force``: nothing changed."""
    already_revoked = "already_revoked"
    """The lease was revoked before and has not run out yet."""
    changed_hands = "changed_hands"
    """The lease's fencing token is not the one given: a new holder; unchanged."""
    free = "free"
    """The lock was already free: nothing to do."""
    unknown = "unknown"
    """The lock has no row: it was never taken."""


@dataclass(frozen=True)
class ReleaseResult:
    """The outcome of ``release``: what was done, and the row as it was before."""

    action: ReleaseAction
    record: LeaseRecord | None
    db_now: datetime


@dataclass(frozen=True)
class RunOutput:
    """What ``--capture-output`` kept of one run: its token and the output tail."""

    token: int
    output: str | None
    """None when the run captured nothing (no ``--capture-output``)."""


class OperatorSession(LeaseSession, Protocol):
    """A session that also runs the operators' queries: status, release, history."""

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Every lock's row, or only ``lock``'s (none if never taken), and now."""
        ...

    def operator_release(
        self, lock: LockId, *, force: bool, token: int | None = None
    ) -> ReleaseResult:
        """An operator's release of ``lock``; see :meth:`ManagedStore.release`."""
        ...

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs (of ``lock``, or of every lock), newest first."""
        ...

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        ...

    def run_output(self, lock: LockId, token: int | None) -> RunOutput | None:
        """The captured output of ``lock``'s newest run, or of run ``token``."""
        ...


class ManagedStore(ABC):
    """A lease store that also serves the operators and can create its tables.

    A store provides :meth:`connect`, :meth:`describe` and :meth:`init`; the
    operators' queries each run on a session of their own. None of them
    creates a table: each raises :class:`leaderrun.errors.SchemaMissingError`
    when the lease table (or the SQLite file) is missing, and
    :class:`leaderrun.errors.DatabaseUnavailableError` when the store cannot be
    used.
    """

    @abstractmethod
    def connect(self) -> OperatorSession:
        """Open a session.

        Raises:
            DatabaseUnavailableError: the database cannot be reached or used.
        """

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages; never includes a password."""

    @abstractmethod
    def init(self) -> InitOutcome:
        """Create leaderrun's tables if missing, or upgrade older ones of its own."""

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Every lock's row, or only ``lock``'s, and the store's now."""
        with contextlib.closing(self.connect()) as session:
            return session.snapshot(lock)

    def release(
        self, lock: LockId, *, force: bool, token: int | None = None
    ) -> ReleaseResult:
        """Free ``lock``'s lease if it expired; with ``force``, revoke a live one.

        With ``token``, only a lease with that fencing token is touched.
        """
        with contextlib.closing(self.connect()) as session:
            return session.operator_release(lock, force=force, token=token)

    def history(self, lock: LockId | None = None, limit: int = 20) -> list[RunRecord]:
        """The newest ``limit`` runs (of ``lock``, or of every lock), newest first.

        A store where no run was recorded yet has an empty history, not an error.
        """
        with contextlib.closing(self.connect()) as session:
            return session.history(lock, limit)

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock, for ``status``."""
        with contextlib.closing(self.connect()) as session:
            return session.last_runs()

    def run_output(self, lock: LockId, token: int | None = None) -> RunOutput | None:
        """The captured output of ``lock``'s newest run, or of run ``token``.

        None when there is no such run in the history.
        """
        with contextlib.closing(self.connect()) as session:
            return session.run_output(lock, token)


def release_outcome(
    lock: LockId,
    token: int | None,
    update: Callable[[], LeaseSnapshot | None],
    snapshot: Callable[[], LeaseSnapshot],
) -> ReleaseResult:
    """An operator's release: one conditional UPDATE, else why it changed nothing.

    ``update`` runs the store's UPDATE and returns the row as it left it, with
    the store's now, or None when no row matched; the reason then comes from
    ``snapshot``, which reads ``lock``'s row just after. Shared by every store
    so that each one decides alike.

    Raises:
        DatabaseUnavailableError: the row kept changing under us.
    """
    # A lease that runs out between the UPDATE and the snapshot is freed on
    # the next round; three rounds cannot all lose such a race.
    for _ in range(3):
        changed = update()
        if changed is not None:
            (record,) = changed.records
            freed = record.holder is None
            action = ReleaseAction.freed if freed else ReleaseAction.revoked
            return ReleaseResult(action, record, changed.db_now)
        seen = snapshot()
        if not seen.records:
            return ReleaseResult(ReleaseAction.unknown, None, seen.db_now)
        record = seen.records[0]
        if token is not None and record.token != token:
            action = ReleaseAction.changed_hands
        elif record.holder is None:
            action = ReleaseAction.free
        elif record.expires_at <= seen.db_now:
            continue
        elif record.holder == REVOKED_HOLDER:
            action = ReleaseAction.already_revoked
        else:
            action = ReleaseAction.refused
        return ReleaseResult(action, record, seen.db_now)
    raise DatabaseUnavailableError(
        f"could not release {lock}: its row kept changing; try again"
    )


_R = TypeVar("_R")

_TIME_FIELDS: dict[type, frozenset[str]] = {}


def _time_fields(cls: type) -> frozenset[str]:
    """The fields of a record dataclass that hold a time (read once per class)."""
    if cls not in _TIME_FIELDS:
        hints = typing.get_type_hints(cls)
        _TIME_FIELDS[cls] = frozenset(
            name
            for name, hint in hints.items()
            if hint is datetime or datetime in typing.get_args(hint)
        )
    return _TIME_FIELDS[cls]


def from_row(
    cls: type[_R],
    row: Row,
    to_datetime: Callable[[Any], datetime],
    columns: Mapping[str, str] | None = None,
) -> _R:
    """A record dataclass (``LeaseRecord``, ``RunRecord``) from a row, by name.

    Each field is read from the column of its name, or of the name ``columns``
    gives it; a time field's value is made a datetime by ``to_datetime`` (None
    stays None). A new field of the record is read with no change here.
    """
    columns = columns or {}
    times = _time_fields(cls)
    values = {}
    for field in fields(cls):  # type: ignore[arg-type]  # a dataclass
        value = row[columns.get(field.name, field.name)]
        if field.name in times and value is not None:
            value = to_datetime(value)
        values[field.name] = value
    return cls(**values)
