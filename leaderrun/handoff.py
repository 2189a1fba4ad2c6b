"""How a waiting contender sleeps: until its turn, or until the holder releases.

``--wait`` contenders are served in arrival order (the fair queue, kept by
PostgreSQL with the acquire statement: ``leaderrun.stores.postgres_sql``). A
holder's release notifies the head of the queue alone, on that waiter's own
channel, in the same statement. The waiter LISTENs on its lease connection,
the LISTEN sent with its next acquire in one round trip, so a waiter keeps one
connection; with ``--listen-dsn`` it listens on a connection of its own to
another server or pool instead (PgBouncer in transaction mode delivers no
notification on a pooled connection: LISTEN is session state).

Notifications carry no safety: a wake-up only makes the waiter try the acquire
statement now instead of later. A waiter never sleeps past its turn as the
database reported it (the holder's expiry, or the lapse of a dead waiter's
place ahead), so a lost or undeliverable notification costs only latency: a
crashed holder is replaced within one retry of its expiry, and behind
PgBouncer without ``--listen-dsn`` waiting degrades to exactly that sleeping,
without an error. Each hand-off costs one acquire statement: the head's.
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
    """A store that can open a connection to listen on (``--listen-dsn``)."""

    def listen(self, lock: LockId, holder: str) -> ReleaseListener:
        """Open a connection that listens for ``holder``'s turn at ``lock``.

        Raises:
            ListenRefusedError: the server refused LISTEN; do not try again.
            DatabaseUnavailableError: the connection could not be made.
        """
        ...


@runtime_checkable
class ListeningSession(Protocol):
    """A lease session that can listen for its own waiter's turn (PostgreSQL)."""

    def listen_here(self, lock: LockId, holder: str) -> ReleaseListener:
        """Listen on this session; the LISTEN goes with its next acquire."""
        ...


class Handoff:
    """The sleeping half of a ``--wait`` loop, woken early by its turn.

    Args:
        lock: the lock being waited for.
        holder: the waiter's holder identity, which names its wake-up.
        enabled: False to sleep until the turn is due only (no LISTEN at all).
        listen_store: listen on a connection to this store (``--listen-dsn``)
            instead of on the lease session.
        clock: a monotonic clock for the length of a sleep (select's own clock).
    """

    def __init__(
        self,
        lock: LockId,
        holder: str,
        *,
        enabled: bool = True,
        listen_store: object = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._enabled = enabled
        self._store = listen_store if isinstance(listen_store, ListeningStore) else None
        self._lock = lock
        self._holder = holder
        self._clock = clock
        self._listener: ReleaseListener | None = None
        self._on: object = None  # the session listened on, if it is the lease's

    @property
    def listening(self) -> bool:
        """Whether a release notification can wake this waiter now."""
        return self._listener is not None

    def listen(self, session: object) -> bool:
        """Subscribe if not yet subscribed; True if this call just did.

        The caller then runs the acquire statement once more at once: with
        ``session`` listening, that statement carries the LISTEN; with a
        connection of its own, a release between the last attempt and the
        LISTEN was announced before anyone listened, and would otherwise be
        noticed only at the holder's expiry.
        """
        if not self._enabled:
            return False
        if self._store is not None:
            return self._listen_apart(self._store)
        if self._on is session or not isinstance(session, ListeningSession):
            return False  # listening already, or a store without notifications
        self.close()
        self._listener = session.listen_here(self._lock, self._holder)
        self._on = session
        log.debug("listening for the release of %s", self._lock)
        return True

    def _listen_apart(self, store: ListeningStore) -> bool:
        """Listen on a connection of its own, to ``--listen-dsn``."""
        if self._listener is not None:
            return False
        try:
            self._listener = store.listen(self._lock, self._holder)
        except ListenRefusedError as exc:
            log.warning("waiting without notifications: %s", exc.message)
            self._enabled = False  # refused once, refused always: stop asking
            return False
        except DatabaseUnavailableError as exc:
            # Tried again at the next wake-up, which is at most one turn away.
            log.warning("waiting without notifications for now: %s", exc.message)
            return False
        log.debug("listening for the release of %s on --listen-dsn", self._lock)
        return True

    def wait(self, signal_fd: int, timeout_s: float) -> bool:
        """Sleep until ``timeout_s`` passes, ``signal_fd`` is readable or our turn.

        Anything else the listening connection reads (another channel's
        notification, a server notice, the error before a disconnect) does not
        end the sleep: an early return would cost the caller a statement.

        Returns:
            True if our turn was announced.
        """
        until_s = self._clock() + max(0.0, timeout_s)
        while True:
            # First what came already: during the last statement, psycopg read
            # it (the session noted it), or it waits in the socket.
            if self._listener is not None and self._drained(self._listener):
                return True
            listener = self._listener
            fds = [signal_fd] if listener is None else [signal_fd, listener.fileno()]
            remaining_s = max(0.0, until_s - self._clock())
            readable, _, _ = select.select(fds, [], [], remaining_s)
            if not readable or signal_fd in readable:
                return False

    def _drained(self, listener: ReleaseListener) -> bool:
        """Drain ``listener``; True if our turn came. A broken one is dropped."""
        try:
            return listener.drain()
        except LeaderrunError as exc:
            log.debug("stopped listening: %s", exc.message)
            self.close()
            return False

    def close(self) -> None:
        """Stop listening (closing a connection of its own); never raises."""
        listener, self._listener, self._on = self._listener, None, None
        if listener is not None:
            listener.close()
