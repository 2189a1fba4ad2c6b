"""Holding a lease: what the command line and the library do alike.

``leaderrun run`` (:class:`leaderrun.runner.Run`) holds one lease for one
command; :class:`leaderrun.elector.LeaderElector` holds a lease for each term of a
long-running service. Around the hard part they share (:class:`LeaseState` and
:class:`Renewer`), both take, keep and give back a lease the same way, and this
module is that way:

- :func:`make_claim`: who asks, unique to this process start (``unique-holder``);
- :class:`Backoff`: the pauses between retries while the database is unusable;
- :class:`Grant`: a lease just granted, timed from *before* its statement was
  sent, usable only if the reply came before its own kill deadline
  (``local-deadline``);
- :class:`HeldLease`: the term's :class:`LeaseState` and the :class:`Renewer`
  that keeps it, built from a grant; its caller starts the renewal thread, the
  command line only once the child was forked from the main thread
  (``child-dies-with-us``);
- :func:`release` and :func:`release_or_expire`: give the lease back, once
  nothing of the term runs any more (``release-last``), or say that it will
  expire; the latter within a bound of its own, on top of the store's bound
  on each statement (``bounded-statements``).

The rule names are those of ``docs/safety.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Self

from leaderrun.bounded import CallTimedOut, call_bounded
from leaderrun.errors import DatabaseUnavailableError
from leaderrun.heartbeat import LeaseState, Renewer
from leaderrun.lease import Lease, Timing, kill_deadline, make_holder, reply_in_time
from leaderrun.runs import RunEnd
from leaderrun.stores.base import Claim, LeaseSession, LeaseStore

log = logging.getLogger("leaderrun")

RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
"""Pauses (seconds) between retries while the database is unusable; the last repeats."""


def make_claim(host: str, command: str) -> Claim:
    """This process's claim on a lock: ``host:pid:nonce``, and what ``status`` shows.

    A fresh nonce for every claim (``unique-holder``): a restarted holder can
    never renew or release the lease of its predecessor, whose child may still
    be alive.
    """
    pid = os.getpid()
    return Claim(
        # secrets.token_hex(8) is exactly this; `secrets` would import hmac too.
        holder=make_holder(host, pid, os.urandom(8).hex()),
        host=host,
        pid=pid,
        command=command,
    )


class Backoff:
    """Pauses between retries while the database is unusable: 0.5, 1, 2, then 5 s.

    Each pause counts one more failure; :meth:`reset` after a statement that
    the database answered.
    """

    def __init__(self) -> None:
        self.failures = 0
        """Pauses taken since the database last answered."""

    def next_pause_s(self) -> float:
        """The pause before the next retry; counts one more failure."""
        pause_s = RECONNECT_BACKOFF_S[min(self.failures, len(RECONNECT_BACKOFF_S) - 1)]
        self.failures += 1
        return pause_s

    def reset(self) -> None:
        """The database answered: the next failure starts the pauses over."""
        self.failures = 0


@dataclass(frozen=True)
class Grant:
    """A lease just granted, the instant its statement was sent, and its session."""

    lease: Lease
    t_sent_s: float
    """When the acquire statement was sent (before it was), on the holder's clock."""
    session: LeaseSession
    window_start: datetime | None = None
    """With ``--once-per``: the start of the window this run belongs to."""

    def usable(self, now_s: float, timing: Timing) -> bool:
        """Whether the grant's reply, at ``now_s``, came before its kill deadline.

        A grant that came later is never used (``local-deadline``): whatever it
        would protect could not be stopped before the lease may pass to
        another. That is logged here; the caller gives the lease back.
        """
        if reply_in_time(self.t_sent_s, now_s, timing):
            return True
        log.warning(
            "the acquire took %.3gs, past the kill deadline; not starting, and "
            "giving the lease back",
            now_s - self.t_sent_s,
        )
        return False


@dataclass(eq=False)
class HeldLease:
    """A lease this process holds: its deadline and loss, and the renewer keeping it.

    ``state`` is read without I/O by whoever enforces the deadline (the
    supervisor, ``LeaderElector.is_leader``); ``renewer`` writes to it from its
    own thread, which the holder starts with :meth:`start_renewing`.
    """

    lease: Lease
    state: LeaseState
    renewer: Renewer

    @classmethod
    def of(
        cls,
        grant: Grant,
        store: LeaseStore,
        timing: Timing,
        *,
        clock: Callable[[], float],
        unit_random: Callable[[], float],
    ) -> Self:
        """Hold ``grant``: its deadline counts from before the acquire was sent.

        The renewer takes over the grant's session; no thread starts yet.
        """
        state = LeaseState(kill_deadline(grant.t_sent_s, timing))
        renewer = Renewer(
            store,
            grant.session,
            grant.lease,
            timing,
            state,
            t_sent_s=grant.t_sent_s,
            clock=clock,
            unit_random=unit_random,
        )
        return cls(grant.lease, state, renewer)

    def start_renewing(self) -> None:
        """Start the renewal thread.

        On the command line, only once the child was forked from the main
        thread: its parent-death signal is tied to that thread's life
        (``child-dies-with-us``).
        """
        self.renewer.start()

    def close(self) -> None:
        """Close the state's wakeup pipe, unless a stuck renewal may still write it.

        A renewal thread that was stopped idle is given a moment to end: the
        stop handed its session back without waiting for it.
        """
        self.renewer.join(ENDING_S)
        if not self.renewer.alive():
            self.state.close()


ENDING_S = 0.5
"""How long closing a held lease waits for a stopped renewal thread to end."""


def release(session: LeaseSession, lease: Lease, end: RunEnd | None = None) -> None:
    """Release ``lease`` on ``session`` (one statement), and log what happened.

    A database failure is logged, not raised: the lease then expires on its own.
    """
    try:
        if session.release(lease, end):
            log.info("released %s", lease.lock, extra={"event": "released"})
        else:
            log.info("%s was no longer ours to release", lease.lock)
    except DatabaseUnavailableError as exc:
        log.warning("could not release (the lease will expire): %s", exc.message)


def release_or_expire(
    store: LeaseStore,
    session: LeaseSession | None,
    lease: Lease,
    timing: Timing,
    end: RunEnd | None = None,
) -> None:
    """Release ``lease`` on ``session`` (or a new one), then close it; bounded.

    The caller's thread waits two attempt budgets at most (a connect, then the
    statement): a release can hang where a renewal would have been abandoned,
    e.g. a commit waiting for a synchronous standby that is gone. One still
    running then is left behind, and the lease expires on its own; its session
    is closed by the thread still using it, once the statement returns.
    """
    opened: list[LeaseSession] = [] if session is None else [session]

    def work() -> None:
        if not opened:
            opened.append(store.connect())
        release(opened[0], lease, end)

    def close() -> None:
        while opened:
            opened.pop().close()

    bound_s = 2 * timing.attempt_budget_s
    try:
        call_bounded(
            work, bound_s, interrupt=_nothing, cleanup=close, name="leaderrun-release"
        )
    except CallTimedOut:
        log.warning(
            "the release took longer than %.3gs; leaving it (the lease of %s will "
            "expire)",
            bound_s,
            lease.lock,
        )
        return
    except Exception as exc:
        close()
        message = getattr(exc, "message", None) or repr(exc)
        log.warning("could not release (the lease will expire): %s", message)
        return
    close()


def _nothing() -> None:
    """No way to interrupt a store's statement from outside: it is left to end."""
