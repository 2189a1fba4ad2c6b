"""The renewal thread, and the lease state it shares with the supervisor.

The renewal thread does the database I/O; the supervisor (main thread) only
reads :class:`LeaseState`, whose lock is never held across I/O. Each renewal
attempt runs on a worker thread with a budget: an attempt that outlives it is
abandoned with its connection, and the next attempt starts on a fresh one, so a
single hung socket cannot use up the time left before the kill deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from leaderrun.clock import boottime
from leaderrun.errors import DatabaseUnavailableError
from leaderrun.lease import Lease, Timing, kill_deadline, renewal_delay_s, reply_in_time
from leaderrun.stores.base import LeaseSession, LeaseStore

log = logging.getLogger("leaderrun")

RETRY_AFTER_FAILURE_S = 0.25
"""Pause (seconds) between a failed renewal attempt and the next one."""


class Renewal(Enum):
    """The outcome of one renewal attempt, or of one turn of the renewal loop."""

    renewed = "renewed"
    """The lease was extended, and the reply came in time to count."""
    lost = "lost"
    """Renewing is over: the lease is gone (the store matched no row, or the
    deadline passed), or the stop has begun and no renewal may count any more."""
    failed = "failed"
    """Nothing is known: the statement failed, timed out or came back late.
    Retried soon; the deadline decides."""


class LeaseState:
    """The kill deadline and loss of one lease, shared by two threads.

    The renewal thread extends the deadline or reports a loss; the supervisor
    reads them and, once it has begun to stop the child, freezes the state so
    that no later renewal result can count (``local-deadline``).
    """

    def __init__(self, deadline_s: float) -> None:
        self._lock = threading.Lock()
        self._deadline_s = deadline_s
        self._lost: str | None = None
        self._frozen = False
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def extend(self, t_sent_s: float, now_s: float, timing: Timing) -> bool:
        """Record a renewal sent at ``t_sent_s`` that succeeded at ``now_s``.

        Returns False (and changes nothing) if the reply came too late to count,
        the renewal was sent after the current deadline, or the kill has begun.
        """
        with self._lock:
            if self._frozen or self._lost is not None:
                return False
            if t_sent_s >= self._deadline_s:
                # Sent after the deadline had passed (leaderrun was paused): the
                # child should already be dying, and a renewal must not revive a
                # lease that may have lapsed (local-deadline; fault F2).
                return False
            if not reply_in_time(t_sent_s, now_s, timing):
                return False
            self._deadline_s = max(self._deadline_s, kill_deadline(t_sent_s, timing))
            return True

    def lose(self, reason: str) -> None:
        """Record that the lease is gone, and wake the supervisor."""
        with self._lock:
            if self._lost is None:
                self._lost = reason
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"!")

    def freeze(self) -> None:
        """Ignore every renewal from now on: the child is being stopped."""
        with self._lock:
            self._frozen = True

    def settled(self) -> bool:
        """Whether no renewal can count any more: frozen, or lost."""
        with self._lock:
            return self._frozen or self._lost is not None

    def snapshot(self) -> tuple[float, str | None]:
        """The current kill deadline and the loss reason (None while held)."""
        with self._lock:
            return self._deadline_s, self._lost

    def fileno(self) -> int:
        """Readable once the lease is lost."""
        return self._read_fd

    def close(self) -> None:
        """Close the wakeup pipe."""
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class _Slot:
    """One connection, owned by whichever attempt uses it; dropped when abandoned."""

    session: LeaseSession | None
    abandoned: bool = False
    busy: threading.Lock = field(default_factory=threading.Lock)

    def drop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class Renewer:
    """Renews one lease every ``renew_interval`` (plus jitter) until stopped.

    Args:
        store: opens fresh sessions after a failure.
        session: the session the lease was acquired on; the renewer owns it now.
        lease: the lease to renew.
        timing: the checked timing.
        state: where successes and the loss are published.
        clock: CLOCK_BOOTTIME, or a fake.
        unit_random: a source of numbers in [0, 1), for the jitter.
    """

    def __init__(
        self,
        store: LeaseStore,
        session: LeaseSession,
        lease: Lease,
        timing: Timing,
        state: LeaseState,
        *,
        t_sent_s: float,
        clock: Callable[[], float] = boottime,
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.lease = lease
        self.timing = timing
        self.state = state
        self.clock = clock
        self.unit_random = unit_random
        self.renewals = 0
        self.failed_attempts = 0
        """Failed attempts since the last renewal: the first is a warning, the
        rest (every RETRY_AFTER_FAILURE_S until the deadline) only debug lines."""
        self._slot = _Slot(session)
        self._last_sent_s = t_sent_s
        self._next_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name="leaderrun-renewer", daemon=True
        )

    def start(self) -> None:
        """Start the renewal thread."""
        self._thread.start()

    def alive(self) -> bool:
        """Whether the renewal thread is still running."""
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a stopped renewal thread to end."""
        if self._stop.is_set() and self._thread.ident is not None:
            self._thread.join(timeout_s)

    def stop(self, timeout_s: float) -> LeaseSession | None:
        """Stop renewing; hand back the idle session if it is free in time.

        With no attempt under way the session is handed back at once, without
        waiting for the renewal thread to wake up and end (it is on the
        hand-off path: the release follows): every attempt checks the stop
        under the lock that it holds while it uses the session, so none will
        touch it again. Otherwise this waits up to ``timeout_s`` for the
        thread to end.
        """
        self._stop.set()
        slot = self._slot
        if slot.busy.acquire(blocking=False):
            try:
                if slot.abandoned:
                    return None
                session, slot.session = slot.session, None
                return session
            finally:
                slot.busy.release()
        if self._thread.ident is not None:  # never started: nothing to join
            self._thread.join(timeout_s)
        if self._thread.is_alive() or self._slot.abandoned:
            return None
        session, self._slot.session = self._slot.session, None
        return session

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never die silently (fault F25)
            log.exception("the renewal thread failed")
            self.state.lose(f"the renewal thread failed: {exc!r}")
            raise

    def _loop(self) -> None:
        while not self._stop.wait(max(0.0, self.next_renewal_s() - self.clock())):
            if self.renew_once() is Renewal.lost:
                return

    def next_renewal_s(self) -> float:
        """The instant (on ``clock``) at which the next renewal is due."""
        if self._next_s is None:
            delay_s = renewal_delay_s(self.timing, self.unit_random())
            self._next_s = self._last_sent_s + delay_s
        return self._next_s

    def renew_once(self) -> Renewal:
        """One renewal, its outcome published to ``state``; schedules the next one.

        The renewal thread calls this in a loop; a caller that never started the
        thread (a test on a fake clock, the elector's ``poll()``) may call it
        directly when it is due. ``Renewal.lost`` means renewing is over (a
        loss is reported to ``state``); ``Renewal.failed``, that the next
        attempt comes soon. Past the deadline it sends nothing and reports the
        loss.
        """
        if self.state.settled():
            # The supervisor is stopping the child (or the lease is lost): no
            # later renewal can count (local-deadline), so send none.
            return Renewal.lost
        t_sent_s = self.clock()
        deadline_s, _ = self.state.snapshot()
        if t_sent_s >= deadline_s:
            # Woken past the deadline (leaderrun was stopped, or the machine
            # slept): the child must be stopped before anything else, so do not
            # renew first (local-deadline; fault F2 in docs/safety.md).
            self.state.lose("the kill deadline passed before the next renewal")
            return Renewal.lost
        outcome = self.attempt()
        if outcome is Renewal.renewed:
            if self.state.extend(t_sent_s, self.clock(), self.timing):
                if self.failed_attempts:
                    log.warning(
                        "renewed %s after %d failed attempt(s)",
                        self.lease.lock,
                        self.failed_attempts,
                    )
                    self.failed_attempts = 0
                self.renewals += 1
                self._last_sent_s = t_sent_s
                delay_s = renewal_delay_s(self.timing, self.unit_random())
                self._next_s = t_sent_s + delay_s
                log.debug("renewed %s (token %s)", self.lease.lock, self.lease.token)
                return Renewal.renewed
            if self.state.settled():
                return Renewal.lost  # frozen while this attempt was under way
            log.warning("a renewal reply came after the kill deadline; ignored")
            self._next_s = self._last_sent_s
            return Renewal.failed
        if outcome is Renewal.lost:
            self.state.lose(
                "the lease was taken over or released by an operator "
                f"(token {self.lease.token} is no longer current)"
            )
            return Renewal.lost
        # Back off a little, then retry until the deadline decides.
        self._last_sent_s = self.clock()
        self._next_s = self._last_sent_s + RETRY_AFTER_FAILURE_S
        return Renewal.failed

    def attempt(self) -> Renewal:
        """One renewal statement within the attempt budget, on a worker thread.

        ``Renewal.renewed`` if the store extended the lease (whether in time is
        for ``state`` to judge), ``Renewal.lost`` if it matched no row (taken
        over or released), ``Renewal.failed`` if it failed or was abandoned.
        """
        slot = self._slot
        result = [Renewal.failed]
        done = threading.Event()

        def work() -> None:
            with slot.busy:
                try:
                    if self._stop.is_set():
                        return  # stopped: the session went back with stop()
                    if slot.session is None:
                        slot.session = self.store.connect()
                    renewed = slot.session.renew(self.lease, self.timing.lease_s)
                    result[0] = Renewal.renewed if renewed else Renewal.lost
                except DatabaseUnavailableError as exc:
                    self.failed_attempts += 1
                    level = (
                        logging.WARNING if self.failed_attempts == 1 else logging.DEBUG
                    )
                    log.log(level, "renewal failed: %s; retrying", exc.message)
                    slot.drop()
                except Exception:
                    log.exception("renewal failed unexpectedly")
                    slot.drop()
                finally:
                    done.set()
                    if slot.abandoned:
                        slot.drop()

        threading.Thread(target=work, name="leaderrun-renewal", daemon=True).start()
        if done.wait(self.timing.attempt_budget_s):
            return result[0]
        # The attempt is stuck (a frozen backend, a blackholed socket). Leave it
        # and its connection behind; the next attempt connects afresh.
        log.warning(
            "renewal attempt took longer than %.3gs; abandoning its connection",
            self.timing.attempt_budget_s,
        )
        slot.abandoned = True
        if slot.busy.acquire(blocking=False):
            # The worker finished just now, before it could see the flag.
            slot.drop()
            slot.busy.release()
        self._slot = _Slot(None)
        return Renewal.failed
