"""The in-memory lease store: the whole store contract, in a dictionary.

A test double (``leaderrun.testing`` re-exports it) that keeps the SQL stores'
semantics, operators' side and run history included, so code built on
leaderrun, and the command line's views of a store, can be tested without a
database; the contract suite (``tests/contract``) runs the same tests on it as
on PostgreSQL and SQLite. Acquire takes a free or expired lock and bumps its
fencing token, renewal is a compare-and-swap on holder and token, release
keeps the row. Its "database time" is the clock it is given, so a test moves a
lease to its expiry by advancing the clock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from leaderrun.errors import DatabaseUnavailableError, StatementTimeoutError
from leaderrun.lease import Lease, LockId
from leaderrun.runs import RUNNING, RunEnd, RunOutcome, RunRecord
from leaderrun.stores.base import (
    MAX_COMMAND_CHARS,
    REVOKED_HOLDER,
    AcquireResult,
    Claim,
    InitOutcome,
    LeaseRecord,
    LeaseSnapshot,
    ManagedStore,
    ReleaseResult,
    RunOutput,
    acquire_result,
    from_row,
    release_outcome,
)

if TYPE_CHECKING:
    from leaderrun.slots import OncePer


@dataclass(frozen=True)
class LeaseRow:
    """One lock's row, as ``leader_lease`` holds it; times are clock seconds."""

    key: int
    name: str | None
    holder: str | None
    token: int
    acquired_at_s: float
    renewed_at_s: float
    expires_at_s: float
    host: str | None
    pid: int | None
    command: str | None
    window_start_s: float | None = None
    window_ok: bool | None = None
    cadence: str | None = None
    runs_ok: int = 0
    runs_failed: int = 0
    runs_killed: int = 0
    runs_timeout: int = 0
    runs_lost: int = 0
    last_ok_at_s: float | None = None

    def counted(self, outcome: RunOutcome, now_s: float) -> LeaseRow:
        """This row with one more run of ``outcome`` counted."""
        field = f"runs_{outcome.value}"
        counts = {field: getattr(self, field) + 1}
        last_ok_s = now_s if outcome is RunOutcome.ok else self.last_ok_at_s
        return replace(self, **counts, last_ok_at_s=last_ok_s)

    def live(self, now_s: float) -> bool:
        """Whether the lease is held at ``now_s`` (by a holder, or revoked)."""
        return self.holder is not None and self.expires_at_s > now_s


@dataclass
class RunRow:
    """One run in the in-memory history, as ``leader_run`` holds it."""

    key: int
    name: str | None
    token: int
    holder: str
    host: str
    window_start_s: float | None
    started_at_s: float
    finished_at_s: float | None = None
    exit_status: int | None = None
    outcome: str | None = None
    pid: int | None = None
    command: str | None = None
    output: str | None = None


class InMemoryLeaseStore(ManagedStore):
    """Leases in a dictionary, with the SQL's semantics and a given clock.

    Args:
        clock: the "database clock"; a :class:`~leaderrun.testing.FakeClock`
            in tests.

    Set ``available = False`` to make every connect and statement fail as an
    unreachable database does, or put kinds of statement ("acquire", "renew",
    "release", "snapshot", "operator_release", "history") in ``failing`` to
    make only those time out (as behind a row lock) while the rest are
    answered. ``statements`` counts the lease statements run, by kind.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.available = True
        self.failing: set[str] = set()
        """Kinds of statement that raise ``StatementTimeoutError``."""
        self.rows: dict[int, LeaseRow] = {}
        self.runs: dict[tuple[int, int], RunRow] = {}
        """The run history, by (lock key, token)."""
        self.statements: dict[str, int] = {"acquire": 0, "renew": 0, "release": 0}
        self.initialized = False
        """Whether ``init`` ran, or a lock was taken: the "tables" exist."""
        # Held by every statement: each is atomic, as one SQL statement is.
        self._lock = threading.Lock()

    def describe(self) -> str:
        """Where the store is: in this process's memory."""
        return "memory"

    def connect(self) -> InMemorySession:
        """Open a session.

        Raises:
            DatabaseUnavailableError: while ``available`` is False.
        """
        self._check()
        return InMemorySession(self)

    def init(self) -> InitOutcome:
        """Created the first time, current after: there is nothing to upgrade."""
        self._check()
        with self._lock:
            created, self.initialized = not self.initialized, True
        return InitOutcome.created if created else InitOutcome.current

    def take_over(self, lock: LockId, holder: str = "thief") -> LeaseRow:
        """Give the lock to ``holder`` with a new token, as a forced takeover would."""
        with self._lock:
            row = self.rows[lock.key]
            now_s = self.clock()
            self.rows[lock.key] = replace(
                row, holder=holder, token=row.token + 1, acquired_at_s=now_s
            )
            return self.rows[lock.key]

    @contextlib.contextmanager
    def statement(self, kind: str) -> Iterator[float]:
        """Run one statement of ``kind``: atomic, counted, failing as asked.

        Yields the store's now. Raises as ``available`` and ``failing`` say.
        """
        with self._lock:
            self._check(kind)
            if kind in self.statements:
                self.statements[kind] += 1
            yield self.clock()

    def _check(self, kind: str | None = None) -> None:
        if not self.available:
            raise DatabaseUnavailableError("the in-memory store is unavailable")
        if kind in self.failing:
            raise StatementTimeoutError(
                f"the in-memory {kind} timed out (the test made it fail)"
            )


class InMemorySession:
    """A session on an :class:`InMemoryLeaseStore`; each method is one statement."""

    def __init__(self, store: InMemoryLeaseStore) -> None:
        self.store = store
        self.closed = False

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
        """Take the lock if it is free or expired in the store's time.

        Keeps no ``--wait`` queue: ``queued`` waiters are served in no
        particular order, as on SQLite.

        With ``once_per``, refuse when the store clock's slot already ran;
        with ``history_keep``, record the run and prune, as the SQL does.
        """
        store = self.store
        with store.statement("acquire") as now_s:
            store.initialized = True
            row = store.rows.get(lock.key)
            window_s = None if once_per is None else once_per.slot_at(now_s).start_s
            done = (
                once_per is not None
                and row is not None
                and row.window_start_s == window_s
                and not (once_per.retry_failed and row.window_ok is not True)
            )
            if row is not None and (done or row.live(now_s) or row.name != lock.name):
                refused = {
                    "acquired": False,
                    "token": row.token,
                    "holder": row.holder,
                    "host": row.host,
                    "pid": row.pid,
                    "expires_in_s": row.expires_at_s - now_s,
                    "lock_name": row.name,
                    "window_start": window_s,
                    "window_done": done,
                }
                return acquire_result(lock, claim, refused, _at)
            token = 1 if row is None else row.token + 1
            # Without --once-per, the row keeps the slot (and cadence) of the
            # last run that had one, as the SQL's coalesce does.
            keep_window = row is not None and window_s is None
            store.rows[lock.key] = LeaseRow(
                key=lock.key,
                name=lock.name,
                holder=claim.holder,
                token=token,
                acquired_at_s=now_s,
                renewed_at_s=now_s,
                expires_at_s=now_s + lease_s,
                host=claim.host,
                pid=claim.pid,
                command=claim.command[:MAX_COMMAND_CHARS],
                window_start_s=row.window_start_s if keep_window and row else window_s,
                window_ok=row.window_ok if keep_window and row else None,
                cadence=(
                    once_per.describe()
                    if once_per is not None
                    else (row.cadence if row is not None else None)
                ),
                **({} if row is None else _counters(row)),
            )
            if history_keep is not None:
                self._record_start(row, lock, claim, token, window_s, history_keep)
            taken = {"acquired": True, "token": token, "window_start": window_s}
            return acquire_result(lock, claim, taken, _at)

    def leave_queue(self, lock: LockId, claim: Claim) -> None:
        """Nothing to leave: this store keeps no queue."""

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease; False if it is no longer ours, or expired."""
        store = self.store
        with store.statement("renew") as now_s:
            row = store.rows.get(lease.lock.key)
            if row is None or (row.holder, row.token) != (lease.holder, lease.token):
                return False
            if row.expires_at_s <= now_s:  # as the SQL: an expired lease stays so
                return False
            store.rows[lease.lock.key] = replace(
                row, renewed_at_s=now_s, expires_at_s=now_s + lease_s
            )
            return True

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row and its token.

        With ``end``, close the run and hold the lease for ``--min-hold``.
        """
        store = self.store
        with store.statement("release") as now_s:
            started = end is None or end.started
            key = (lease.lock.key, lease.token)
            found = store.runs.get(key)
            run = found if found is not None and found.holder == lease.holder else None
            # Counted once: unless another node closed it as lost (and counted).
            once = (
                end is not None
                and started
                and (run is None or run.finished_at_s is None)
            )
            if run is not None and not started:
                del store.runs[key]
            elif (
                end is not None
                and run is not None
                and (run.finished_at_s is None or run.outcome == RunOutcome.lost)
            ):
                if run.finished_at_s is None:
                    run.finished_at_s = now_s
                run.exit_status = end.exit_status
                run.outcome = end.outcome.value
                run.output = end.output
            row = store.rows.get(lease.lock.key)
            if row is None or (row.holder, row.token) != (lease.holder, lease.token):
                return False
            hold_until_s = row.acquired_at_s + (0.0 if end is None else end.min_hold_s)
            window_ok = None if end is None else end.window_ok
            if end is not None and once:
                row = row.counted(end.outcome, now_s)
            store.rows[lease.lock.key] = replace(
                row,
                holder=row.holder if hold_until_s > now_s else None,
                expires_at_s=max(now_s, hold_until_s),
                window_ok=(row.window_ok if window_ok is None else window_ok)
                if started
                else None,
                window_start_s=row.window_start_s if started else None,
            )
            return True

    def snapshot(self, lock: LockId | None) -> LeaseSnapshot:
        """Every lock's row, or only ``lock``'s, and the store's now."""
        store = self.store
        with store.statement("snapshot") as now_s:
            rows = [
                row
                for row in store.rows.values()
                if lock is None or row.key == lock.key
            ]
        rows.sort(key=lambda row: (row.name is None, row.name or "", row.key))
        return LeaseSnapshot(_at(now_s), tuple(_record(row) for row in rows))

    def operator_release(
        self, lock: LockId, *, force: bool, token: int | None = None
    ) -> ReleaseResult:
        """An operator's release, decided as the SQL's conditional UPDATE does."""
        store = self.store

        def update() -> LeaseSnapshot | None:
            with store.statement("operator_release") as now_s:
                row = store.rows.get(lock.key)
                if row is None or row.holder is None:
                    return None
                if token is not None and row.token != token:
                    return None
                expired = row.expires_at_s <= now_s
                if not (expired or (force and row.holder != REVOKED_HOLDER)):
                    return None
                row = replace(row, holder=None if expired else REVOKED_HOLDER)
                store.rows[lock.key] = row
            return LeaseSnapshot(_at(now_s), (_record(row),))

        return release_outcome(lock, token, update, lambda: self.snapshot(lock))

    def history(self, lock: LockId | None, limit: int) -> list[RunRecord]:
        """The newest ``limit`` runs, of one lock or of all, newest first."""
        runs = self._runs(lock)
        runs.sort(
            key=lambda run: (-run.started_at.timestamp(), run.lock_key, -run.token)
        )
        return runs[:limit]

    def last_runs(self) -> list[RunRecord]:
        """The newest run of every lock that has one, by lock key."""
        newest: dict[int, RunRecord] = {}
        for run in self._runs(None):
            if run.lock_key not in newest or run.token > newest[run.lock_key].token:
                newest[run.lock_key] = run
        return [newest[key] for key in sorted(newest)]

    def run_output(self, lock: LockId, token: int | None) -> RunOutput | None:
        """The captured output of ``lock``'s newest run, or of run ``token``."""
        with self.store.statement("history"):
            runs = [
                run
                for (key, run_token), run in self.store.runs.items()
                if key == lock.key and token in (None, run_token)
            ]
        newest = max(runs, key=lambda run: run.token, default=None)
        return None if newest is None else RunOutput(newest.token, newest.output)

    def close(self) -> None:
        """Mark the session closed."""
        self.closed = True

    def _runs(self, lock: LockId | None) -> list[RunRecord]:
        """The history's runs (of ``lock``, or all), as the SQL's views show them."""
        store = self.store
        with store.statement("history") as now_s:
            return [
                _run_record(run, store.rows.get(run.key), now_s)
                for run in store.runs.values()
                if lock is None or run.key == lock.key
            ]

    def _record_start(
        self,
        previous: LeaseRow | None,
        lock: LockId,
        claim: Claim,
        token: int,
        window_s: float | None,
        keep: int,
    ) -> None:
        """The SQL's history CTEs: close dead holders' runs, record, prune."""
        store = self.store
        now_s = store.clock()
        for (key, run_token), run in list(store.runs.items()):
            if key != lock.key:
                continue
            if run_token <= token - keep:
                del store.runs[(key, run_token)]
            elif run.finished_at_s is None:
                last_seen_s = (
                    previous.renewed_at_s
                    if previous is not None and previous.token == run_token
                    else now_s
                )
                run.finished_at_s, run.outcome = last_seen_s, RunOutcome.lost.value
                row = store.rows[lock.key]
                store.rows[lock.key] = row.counted(RunOutcome.lost, now_s)
        store.runs[(lock.key, token)] = RunRow(
            key=lock.key,
            name=lock.name,
            token=token,
            holder=claim.holder,
            host=claim.host,
            window_start_s=window_s,
            started_at_s=now_s,
            pid=claim.pid,
            command=claim.command[:MAX_COMMAND_CHARS],
        )


def _counters(row: LeaseRow) -> dict[str, Any]:
    """The counters a row carries from one holder to the next."""
    names = [f"runs_{o.value}" for o in RunOutcome] + ["last_ok_at_s"]
    return {name: getattr(row, name) for name in names}


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _utc(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else _at(epoch_s)


def _record(row: LeaseRow) -> LeaseRecord:
    return from_row(LeaseRecord, asdict(row), _at, _LEASE_FIELDS)


_LEASE_FIELDS = {
    f"{name}_at": f"{name}_at_s"
    for name in ("acquired", "renewed", "expires", "last_ok")
}
"""The row's field behind each :class:`LeaseRecord` time."""

_RUN_FIELDS = {
    "lock_key": "key",
    "lock_name": "name",
    **{name: f"{name}_s" for name in ("window_start", "started_at", "finished_at")},
}
"""The run's field behind each :class:`RunRecord` field of another name."""


def _run_record(run: RunRow, lease: LeaseRow | None, now_s: float) -> RunRecord:
    """A run as ``history`` shows it.

    One with no outcome is running while its lease (same token) is live, and
    otherwise lost; one that has not finished has lasted until its lease's
    last renewal, or until now.
    """
    term = lease if lease is not None and lease.token == run.token else None
    if run.outcome is not None:
        outcome = run.outcome
    elif term is not None and term.live(now_s):
        outcome = RUNNING
    else:
        outcome = RunOutcome.lost.value
    if run.finished_at_s is not None:
        end_s = run.finished_at_s
    elif term is not None:
        end_s = min(term.renewed_at_s, now_s)
    else:
        end_s = now_s
    row = {**asdict(run), "outcome": outcome, "duration_s": end_s - run.started_at_s}
    return from_row(RunRecord, row, _at, _RUN_FIELDS)
