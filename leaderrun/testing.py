"""Public test doubles: a clock that moves when told, and an in-memory lease store.

They let code built on leaderrun be tested without a database and without
sleeping. The store keeps the semantics of the SQL (``leaderrun.stores.postgres``):
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
from typing import Any

from leaderrun.elector import LeaderElector
from leaderrun.stores.base import LeaseStore
from leaderrun.stores.memory import (
    InMemoryLeaseStore,
    InMemorySession,
    LeaseRow,
    RunRow,
)

__all__ = [
    "FakeClock",
    "InMemoryLeaseStore",
    "InMemorySession",
    "LeaseRow",
    "RunRow",
    "make_elector",
]


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
