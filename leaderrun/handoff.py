"""How a waiting contender sleeps: until the holder's expiry, or until it releases.

A holder that releases sends a notification on the lock's channel in the same
statement (``leaderrun.stores.postgres_sql``). A ``--wait`` contender listens on a
connection of its own, never the lease connection, which must stay free of
session state (``no-session-state``). It still never sleeps past the holder's expiry as
the database reported it, so a lost or unsupported notification costs only
latency: a crashed holder is replaced within one retry of its expiry, and
behind PgBouncer in transaction mode, where LISTEN is accepted but nothing is
ever delivered, waiting degrades to exactly that sleeping, without an error.

Notifications carry no safety: a wake-up only makes the waiter try the acquire
statement now instead of later. Each notified waiter runs that statement once,
then sleeps again on the new holder's expiry: one failed statement per waiter per
hand-off, whatever the number of waiters.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from leaderrun.errors import (
    DatabaseUnavailableError,
    LeaderrunError,
    ListenRefusedError,
)
from leaderrun.lease import LockId

log = logging.getLogger("leaderrun")


class ReleaseListener(Protocol):
    """A connection subscribed to one lock's releases."""

    def fileno(self) -> int:
        """A descriptor that becomes readable when a notification may be waiting."""
        ...

    def drain(self) -> bool:
        """Consume what arrived, without blocking; True if a release was announced.

        Raises:
            DatabaseUnavailableError: the connection is broken.
        """
        ...

    def close(self) -> None:
        """Close the connection; never raises."""
        ...


@runtime_checkable
class ListeningStore(Protocol):
    """A store that can announce releases (PostgreSQL can; others may not)."""

    def listen(self, lock: LockId) -> ReleaseListener:
        """Open a connection that listens for releases of ``lock``.

        Raises:
            ListenRefusedError: the server refused LISTEN; do not try again.
            DatabaseUnavailableError: the connection could not be made.
        """
        ...


class Handoff:
    """The sleeping half of a ``--wait`` loop, woken early by a release.

    Args:
        store: the lease store; one without ``listen`` leaves polling alone.
        lock: the lock being waited for.
        enabled: False to sleep until expiry only (no LISTEN connection at all).
        clock: a monotonic clock for the length of a sleep (select's own clock).
    """

    def __init__(
        self,
        store: object,
        lock: LockId,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store if enabled and isinstance(store, ListeningStore) else None
        self._lock = lock
        self._clock = clock
        self._listener: ReleaseListener | None = None

    @property
    def listening(self) -> bool:
        """Whether a release notification can wake this waiter now."""
        return self._listener is not None

    def listen(self) -> bool:
        """Subscribe if not yet subscribed; True if this call just did.

        The caller then runs the acquire statement once more at once: a release
        between its last attempt and the LISTEN was announced before anyone
        listened, and would otherwise be noticed only at the holder's expiry.
        """
        if self._store is None or self._listener is not None:
            return False
        try:
            self._listener = self._store.listen(self._lock)
        except ListenRefusedError as exc:
            log.debug("waiting without notifications: %s", exc.message)
            self._store = None  # refused once, refused always: stop asking
            return False
        except DatabaseUnavailableError as exc:
            # Tried again at the next wake-up, which is at most one expiry away.
            log.debug("waiting without notifications for now: %s", exc.message)
            return False
        log.debug("listening for releases of %s", self._lock)
        return True

    def wait(self, signal_fd: int, timeout_s: float) -> bool:
        """Sleep until ``timeout_s`` passes, ``signal_fd`` is readable or a release.

        Anything else the listening connection reads (another channel's
        notification, a server notice, the error before a disconnect) does not
        end the sleep: an early return would cost the caller a statement.

        Returns:
            True if a release of the lock was announced.
        """
        until_s = self._clock() + max(0.0, timeout_s)
        while True:
            listener = self._listener
            fds = [signal_fd] if listener is None else [signal_fd, listener.fileno()]
            remaining_s = max(0.0, until_s - self._clock())
            readable, _, _ = select.select(fds, [], [], remaining_s)
            if not readable or signal_fd in readable:
                return False
            if listener is not None:
                try:
                    if listener.drain():
                        return True
                except LeaderrunError as exc:
                    log.debug("stopped listening: %s", exc.message)
                    self.close()
            if self._clock() >= until_s:
                return False

    def close(self) -> None:
        """Drop the listening connection, if any; never raises."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
