"""The in-memory lease store: the SQL stores' contract, in a dictionary.

A test double (``leaderrun.testing`` re-exports it), and the reference the
contract suite (``tests/contract``) holds the SQL stores to. It keeps their
semantics: acquire takes a free or expired lock and bumps its fencing token,
renewal is a compare-and-swap on holder and token, release keeps the row. Its
"database time" is the clock it is given, so a test moves a lease to its expiry
by advancing the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from leaderrun.errors import DatabaseUnavailableError, StatementTimeoutError
from leaderrun.lease import Lease, LockId
from leaderrun.runs import OncePer, RunEnd, RunOutcome, window_start_s
from leaderrun.stores.base import AcquireResult, Claim, key_collision


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


class InMemoryLeaseStore:
    """Leases in a dictionary, with the SQL's semantics and a given clock.

    Args:
        clock: the "database clock"; a :class:`FakeClock` in tests.

    Set ``available = False`` to make every connect and statement fail as an
    unreachable database does, or put kinds of statement ("acquire", "renew",
    "release") in ``failing`` to make only those time out (as behind a row
    lock) while the rest are answered. ``statements`` counts the statements
    run, by kind.
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

    def take_over(self, lock: LockId, holder: str = "thief") -> LeaseRow:
        """Give the lock to ``holder`` with a new token, as a forced takeover would."""
        with self._lock:
            row = self.rows[lock.key]
            now_s = self.clock()
            self.rows[lock.key] = replace(
                row, holder=holder, token=row.token + 1, acquired_at_s=now_s
            )
            return self.rows[lock.key]

    def _check(self, kind: str | None = None) -> None:
        if not self.available:
            raise DatabaseUnavailableError("the in-memory store is unavailable")
        if kind in self.failing:
            raise StatementTimeoutError(
                f"the in-memory {kind} timed out (the test made it fail)"
            )

    def _acquire(
        self,
        lock: LockId,
        claim: Claim,
        lease_s: float,
        once_per: OncePer | None = None,
        history_keep: int | None = None,
    ) -> AcquireResult:
        with self._lock:
            self._check("acquire")
            self.statements["acquire"] += 1
            now_s = self.clock()
            row = self.rows.get(lock.key)
            if row is not None and row.name != lock.name:
                raise key_collision(lock, row.name)
            window_s = (
                None
                if once_per is None
                else window_start_s(now_s, once_per.period_s, once_per.offset_s)
            )
            done = (
                once_per is not None
                and row is not None
                and row.window_start_s == window_s
                and not (once_per.retry_failed and row.window_ok is not True)
            )
            if not done and (
                row is None or row.holder is None or row.expires_at_s <= now_s
            ):
                token = 1 if row is None else row.token + 1
                # Without --once-per, the row keeps the window of the last run
                # that had one, as the SQL's coalesce does.
                old_window_s, old_ok = (
                    (row.window_start_s, row.window_ok)
                    if row is not None and window_s is None
                    else (window_s, None)
                )
                self.rows[lock.key] = LeaseRow(
                    key=lock.key,
                    name=lock.name,
                    holder=claim.holder,
                    token=token,
                    acquired_at_s=now_s,
                    renewed_at_s=now_s,
                    expires_at_s=now_s + lease_s,
                    host=claim.host,
                    pid=claim.pid,
                    command=claim.command,
                    window_start_s=old_window_s,
                    window_ok=old_ok,
                )
                if history_keep is not None:
                    self._record_start(row, lock, claim, token, window_s, history_keep)
                return AcquireResult(
                    lease=Lease(lock, claim.holder, token),
                    window_start=_utc(window_s),
                )
            if row is None:
                return AcquireResult(lease=None)
            return AcquireResult(
                lease=None,
                holder=row.holder,
                holder_host=row.host,
                holder_pid=row.pid,
                expires_in_s=row.expires_at_s - now_s,
                window_start=_utc(window_s),
                window_done=done,
            )

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
        now_s = self.clock()
        for (key, run_token), run in list(self.runs.items()):
            if key != lock.key:
                continue
            if run_token <= token - keep:
                del self.runs[(key, run_token)]
            elif run.finished_at_s is None:
                last_seen_s = (
                    previous.renewed_at_s
                    if previous is not None and previous.token == run_token
                    else now_s
                )
                run.finished_at_s, run.outcome = last_seen_s, RunOutcome.lost.value
        self.runs[(lock.key, token)] = RunRow(
            key=lock.key,
            name=lock.name,
            token=token,
            holder=claim.holder,
            host=claim.host,
            window_start_s=window_s,
            started_at_s=now_s,
        )

    def _renew(self, lease: Lease, lease_s: float) -> bool:
        with self._lock:
            self._check("renew")
            self.statements["renew"] += 1
            row = self.rows.get(lease.lock.key)
            if row is None or (row.holder, row.token) != (lease.holder, lease.token):
                return False
            now_s = self.clock()
            if row.expires_at_s <= now_s:  # as the SQL: an expired lease stays so
                return False
            self.rows[lease.lock.key] = replace(
                row, renewed_at_s=now_s, expires_at_s=now_s + lease_s
            )
            return True

    def _release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        with self._lock:
            self._check("release")
            self.statements["release"] += 1
            now_s = self.clock()
            run = self.runs.get((lease.lock.key, lease.token))
            if (
                end is not None
                and run is not None
                and run.holder == lease.holder
                and (run.finished_at_s is None or run.outcome == RunOutcome.lost)
            ):
                if run.finished_at_s is None:
                    run.finished_at_s = now_s
                run.exit_status = end.exit_status
                run.outcome = end.outcome.value
            row = self.rows.get(lease.lock.key)
            if row is None or (row.holder, row.token) != (lease.holder, lease.token):
                return False
            hold_until_s = row.acquired_at_s + (0.0 if end is None else end.min_hold_s)
            window_ok = None if end is None else end.window_ok
            self.rows[lease.lock.key] = replace(
                row,
                holder=row.holder if hold_until_s > now_s else None,
                expires_at_s=max(now_s, hold_until_s),
                window_ok=row.window_ok if window_ok is None else window_ok,
            )
            return True


def _utc(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC)


class InMemorySession:
    """A session on an :class:`InMemoryLeaseStore`."""

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
    ) -> AcquireResult:
        """Take the lock if it is free or expired in the store's time.

        With ``once_per``, refuse when the store clock's window already ran;
        with ``history_keep``, record the run and prune, as the SQL does.
        """
        return self.store._acquire(lock, claim, lease_s, once_per, history_keep)

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease; False if it is no longer ours."""
        return self.store._renew(lease, lease_s)

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        """End our lease now, keeping the row and its token.

        With ``end``, close the run and hold the lease for ``--min-hold``.
        """
        return self.store._release(lease, end)

    def close(self) -> None:
        """Mark the session closed."""
        self.closed = True
