"""Public test doubles: a clock that moves when told, and an in-memory lease store.

They let code built on leaderrun be tested without a database and without
sleeping. The store keeps the semantics of the SQL (``leaderrun.postgres``):
acquire takes a free or expired lock and bumps its fencing token, renewal is a
compare-and-swap on holder and token, release keeps the row. Its "database
time" is the clock it is given, so a test moves a lease to its expiry by
advancing the clock.

:func:`make_elector` puts the two together: a :class:`~leaderrun.LeaderElector`
that is never started, driven by calling its ``poll()``, to unit-test code
decorated with ``@leader_only`` (see ``docs/library.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from leaderrun.elector import LeaderElector
from leaderrun.errors import DatabaseUnavailableError
from leaderrun.lease import Lease, LockId
from leaderrun.store import AcquireResult, Claim, LeaseStore, key_collision


class FakeClock:
    """A clock that stands still until :meth:`advance` moves it.

    It is callable, so it can be passed wherever leaderrun takes a
    ``clock: Callable[[], float]``, and has ``now()`` for the ``Clock`` protocol.
    """

    def __init__(self, start_s: float = 1000.0) -> None:
        self._now_s = start_s
        self._lock = threading.Lock()

    def now(self) -> float:
        """The current fake instant, in seconds."""
        with self._lock:
            return self._now_s

    def __call__(self) -> float:
        """The current fake instant, like :meth:`now`."""
        return self.now()

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backward)."""
        if not seconds >= 0:  # also refuses NaN, which would poison every deadline
            raise ValueError(f"a clock only moves forward, not by {seconds!r}s")
        with self._lock:
            self._now_s += seconds


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


class InMemoryLeaseStore:
    """Leases in a dictionary, with the SQL's semantics and a given clock.

    Args:
        clock: the "database clock"; a :class:`FakeClock` in tests.

    Set ``available = False`` to make every connect and statement fail as an
    unreachable database does. ``statements`` counts the statements run, by
    kind ("acquire", "renew", "release").
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.available = True
        self.rows: dict[int, LeaseRow] = {}
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

    def _check(self) -> None:
        if not self.available:
            raise DatabaseUnavailableError("the in-memory store is unavailable")

    def _acquire(self, lock: LockId, claim: Claim, lease_s: float) -> AcquireResult:
        with self._lock:
            self._check()
            self.statements["acquire"] += 1
            now_s = self.clock()
            row = self.rows.get(lock.key)
            if row is not None and row.name != lock.name:
                raise key_collision(lock, row.name)
            if row is None or row.holder is None or row.expires_at_s <= now_s:
                token = 1 if row is None else row.token + 1
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
                )
                return AcquireResult(lease=Lease(lock, claim.holder, token))
            return AcquireResult(
                lease=None,
                holder=row.holder,
                holder_host=row.host,
                holder_pid=row.pid,
                expires_in_s=row.expires_at_s - now_s,
            )

    def _renew(self, lease: Lease, lease_s: float) -> bool:
        with self._lock:
            self._check()
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

    def _release(self, lease: Lease) -> bool:
        with self._lock:
            self._check()
            self.statements["release"] += 1
            row = self.rows.get(lease.lock.key)
            if row is None or (row.holder, row.token) != (lease.holder, lease.token):
                return False
            self.rows[lease.lock.key] = replace(
                row, holder=None, expires_at_s=self.clock()
            )
            return True


class InMemorySession:
    """A session on an :class:`InMemoryLeaseStore`."""

    def __init__(self, store: InMemoryLeaseStore) -> None:
        self.store = store
        self.closed = False

    def acquire(self, lock: LockId, claim: Claim, lease_s: float) -> AcquireResult:
        """Take the lock if it is free or expired in the store's time."""
        return self.store._acquire(lock, claim, lease_s)

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease; False if it is no longer ours."""
        return self.store._renew(lease, lease_s)

    def release(self, lease: Lease) -> bool:
        """End our lease now, keeping the row and its token."""
        return self.store._release(lease)

    def close(self) -> None:
        """Mark the session closed."""
        self.closed = True


def make_elector(
    lock_id: str | int = "test",
    *,
    store: LeaseStore | None = None,
    clock: Callable[[], float] | None = None,
    poll: bool = True,
    **kwargs: Any,
) -> LeaderElector:
    """An elector on a fake clock and an in-memory store, driven by ``poll()``.

    Its thread is never started: nothing happens unless the test calls
    ``elector.poll()`` (one campaign step: acquire, renew when due, or end a
    lost term) or moves the clock. With ``poll=True`` (the default) it has
    polled once, so it leads if the lock was free. Jitter is zero, so every
    delay is exact. Other keyword arguments go to :class:`LeaderElector`.

    Args:
        lock_id: the lock.
        store: share one store between electors to make them compete; default
            a new one on ``clock``.
        clock: default the store's clock, or a new :class:`FakeClock`.
        poll: poll once before returning.
        **kwargs: more :class:`LeaderElector` arguments (timings, callbacks).
    """
    store_clock: Callable[[], float] | None = getattr(store, "clock", None)
    chosen: Callable[[], float] = clock or store_clock or FakeClock()
    if store is None:
        store = InMemoryLeaseStore(chosen)
    kwargs.setdefault("unit_random", lambda: 0.0)
    kwargs.setdefault("host", "test")
    elector = LeaderElector(lock_id, store=store, clock=chosen, **kwargs)
    if poll:
        elector.poll()
    return elector
