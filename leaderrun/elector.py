"""``LeaderElector``: one leader among the replicas of a long-running service.

The elector campaigns for a lease row (the same table, SQL and timing rules as the
command line), renews it while leading, and answers :meth:`LeaderElector.is_leader`
from a local deadline on ``CLOCK_BOOTTIME``, measured from *before* the statement
that last acquired or renewed the lease. That deadline is the command line's kill
deadline: with the same timing it falls ``kill_grace`` (plus a safety margin)
before any other replica can take the lease over, whatever the database, the
network or the renewal thread are doing. ``is_leader()`` computes from it on every
call; no flag has to be cleared for it to turn false.

Threads (see ``docs/library.md``):

- the *campaign thread* (``leaderrun-elector``), started by :meth:`start`, runs
  the acquire statements, watches the current term, and calls ``on_elected`` and
  ``on_lost``;
- the *renewal thread* (``leaderrun-renewer``, :class:`leaderrun.heartbeat.Renewer`,
  shared with the command line) renews while leading, each attempt on a worker
  thread with a budget, so that a hung socket cannot stall it.

An elector that is never started does nothing by itself: :meth:`poll` runs one
step of the campaign in the caller's thread. Tests drive it that way with a
:class:`leaderrun.testing.FakeClock` and an in-memory store, without sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from leaderrun.clock import boottime
from leaderrun.config import (
    RawRunOptions,
    check_schema,
    lock_from,
    resolve_dsn,
    timing_from,
)
from leaderrun.errors import ConfigError, DatabaseUnavailableError
from leaderrun.heartbeat import LeaseState, Renewer
from leaderrun.lease import (
    DEFAULT_LEASE_S,
    Lease,
    LockId,
    Timing,
    kill_deadline,
    make_holder,
    make_timing,
    parse_lock_id,
    retry_delay_s,
)
from leaderrun.store import Claim, LeaseSession, LeaseStore

if TYPE_CHECKING:
    from types import TracebackType

    from leaderrun.postgres import ConnectionFactory

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")

RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
"""Pauses (seconds) between campaign attempts while the database is unusable."""

LOST_DEADLINE = "no renewal succeeded before the local deadline"
"""The start of ``on_lost``'s reason when renewals failed or stalled too long."""

LOST_RELEASED = "released"
"""``on_lost``'s reason after :meth:`LeaderElector.release`."""

LOST_STOPPED = "stopped"
"""``on_lost``'s reason after :meth:`LeaderElector.stop`."""

ENV_TWINS = {
    "lock_id": "LEADERRUN_LOCK_ID",
    "dsn": "LEADERRUN_DSN",
    "schema": "LEADERRUN_SCHEMA",
    "lease_duration": "LEADERRUN_LEASE_DURATION",
    "renew_interval": "LEADERRUN_RENEW_INTERVAL",
    "jitter": "LEADERRUN_JITTER",
    "kill_grace": "LEADERRUN_KILL_GRACE",
}
"""The command line's variables that :meth:`LeaderElector.from_env` reads."""

ElectedCallback = Callable[[int], object]
"""``on_elected(token)``: called once at the start of each term."""

LostCallback = Callable[[str], object]
"""``on_lost(reason)``: called once at the end of each term."""


class _Current:
    """The one piece of process-wide state: the current elector."""

    elector: LeaderElector | None = None
    lock = threading.Lock()


def current_elector() -> LeaderElector | None:
    """The elector that module-level :func:`leaderrun.is_leader` asks, if any.

    It is the elector most recently started (:meth:`LeaderElector.start`, or
    entering its ``with`` block) and not yet stopped, or the one set by
    :func:`use_elector`.
    """
    return _Current.elector


@contextlib.contextmanager
def use_elector(elector: LeaderElector | None) -> Iterator[LeaderElector | None]:
    """Make ``elector`` the current one inside a ``with`` block; restore after.

    For tests, and for a process that drives an elector with :meth:`poll`
    without starting its thread.
    """
    with _Current.lock:
        previous, _Current.elector = _Current.elector, elector
    try:
        yield elector
    finally:
        with _Current.lock:
            _Current.elector = previous


@dataclass
class _Term:
    """One stretch of leadership: from the acquire to the end of the lease."""

    lease: Lease
    state: LeaseState
    renewer: Renewer


class LeaderElector:
    """Elect one leader among the processes that share a lock.

    Args:
        lock_id: an integer, or a name hashed to a 64-bit key (as ``--lock-id``).
        dsn: a libpq connection string or URI, or ``sqlite:///PATH`` for the
            processes of one host; None falls back to ``LEADERRUN_DSN``, then
            ``DATABASE_URL``, then libpq's ``PG*`` variables (as the command
            line does), and with none of them it is refused.
        schema: the schema of the ``leader_lease`` table.
        connection_factory: opens psycopg connections instead of ``dsn``; each
            one is switched to autocommit without prepared statements.
        store: a lease store to use instead of PostgreSQL (for tests:
            :class:`leaderrun.testing.InMemoryLeaseStore`).
        lease_s: the lease duration in database time (``--lease-duration``).
        renew_interval_s: time between renewals; default ``lease_s / 6``.
        jitter_s: random delay added to each renewal; default a fifth of it.
        kill_grace_s: how long your code may take to stop leader-only work once
            ``is_leader()`` turns false, before another replica could be elected
            (``--kill-grace``); default ``lease_s / 6``, at most 5 s.
        on_elected: called with the fencing token at the start of every term.
        on_lost: called with a reason at the end of every term.
        clock: CLOCK_BOOTTIME, or a :class:`leaderrun.testing.FakeClock`.
        unit_random: numbers in [0, 1), for the jitter.
        host: this machine's name in the lease row; default the hostname.
        env: where ``dsn=None`` looks for ``LEADERRUN_DSN`` and
            ``DATABASE_URL``; default ``os.environ``.

    Raises:
        ConfigError: an invalid lock id, schema or DSN.
        UnsafeTimingError: the timing violates the safety inequality (the
            message names it, and a lease duration that would work).
    """

    def __init__(
        self,
        lock_id: str | int,
        dsn: str | None = None,
        *,
        schema: str = "public",
        connection_factory: ConnectionFactory | None = None,
        store: LeaseStore | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        renew_interval_s: float | None = None,
        jitter_s: float | None = None,
        kill_grace_s: float | None = None,
        on_elected: ElectedCallback | None = None,
        on_lost: LostCallback | None = None,
        clock: Callable[[], float] = boottime,
        unit_random: Callable[[], float] = random.random,
        host: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(lock_id, bool) or not isinstance(lock_id, int | str):
            raise ConfigError(
                f"lock_id {lock_id!r} must be an integer or a name, e.g. 'scheduler'"
            )
        self.lock: LockId = parse_lock_id(str(lock_id), option="lock_id")
        self.timing: Timing = make_timing(
            lease_s, renew_interval_s, jitter_s, kill_grace_s
        )
        if store is None:
            resolved_dsn, _ = resolve_dsn(
                dsn or (env or os.environ).get("LEADERRUN_DSN"),
                os.environ if env is None else env,
                "dsn",
            )
            if connection_factory is None:
                # The DSN picks PostgreSQL or SQLite, as on the command line.
                from leaderrun.backends import open_store

                store = open_store(
                    resolved_dsn,
                    check_schema(schema),
                    os.environ if env is None else env,
                    attempt_budget_s=self.timing.attempt_budget_s,
                )
            else:
                from leaderrun.postgres import PostgresLeaseStore  # psycopg: now

                store = PostgresLeaseStore(
                    "" if dsn is None else resolved_dsn,
                    check_schema(schema),
                    attempt_budget_s=self.timing.attempt_budget_s,
                    connection_factory=connection_factory,
                )
        self.store: LeaseStore = store
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.clock = clock
        self.unit_random = unit_random
        host = host or socket.gethostname()
        pid = os.getpid()
        self.claim = Claim(
            holder=make_holder(host, pid, secrets.token_hex(8)),
            host=host,
            pid=pid,
            command=f"{os.path.basename(sys.argv[0] or 'python')} (LeaderElector)",
        )
        self.last_error: str | None = None
        """The last campaign failure (database unusable), or None."""
        self._lock = threading.Lock()
        self._elected = threading.Condition(self._lock)
        self._term: _Term | None = None
        self._session: LeaseSession | None = None
        self._next_attempt_s = -float("inf")
        self._failures = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> LeaderElector:
        """An elector configured as ``leaderrun`` would be, from the environment.

        Reads ``LEADERRUN_LOCK_ID``, ``LEADERRUN_DSN`` (then ``DATABASE_URL``
        and libpq's ``PG*``), ``LEADERRUN_SCHEMA``, ``LEADERRUN_LEASE_DURATION``,
        ``LEADERRUN_RENEW_INTERVAL``, ``LEADERRUN_JITTER`` and
        ``LEADERRUN_KILL_GRACE`` (durations such as ``30s`` or ``1m``), and the
        seed's ``LE_*`` aliases in milliseconds. Keyword arguments (callbacks, a
        ``connection_factory``...) go to the constructor.

        Raises:
            ConfigError: a value is missing or invalid; the message names the
                variable.
        """
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return env.get(ENV_TWINS[name]) or None

        options = RawRunOptions(
            lock_id=get("lock_id"),
            dsn=get("dsn"),
            schema=get("schema"),
            lease_duration=get("lease_duration"),
            renew_interval=get("renew_interval"),
            jitter=get("jitter"),
            kill_grace=get("kill_grace"),
            labels=ENV_TWINS,
        )
        lock = lock_from(options.lock_id, env, ENV_TWINS["lock_id"])
        timing = timing_from(options, env)
        return cls(
            lock.name if lock.name is not None else lock.key,
            options.dsn,
            schema=options.schema or "public",
            lease_s=timing.lease_s,
            renew_interval_s=timing.renew_interval_s,
            jitter_s=timing.jitter_s,
            kill_grace_s=timing.kill_grace_s,
            env=env,
            **kwargs,
        )

    # --- what the application asks --------------------------------------------

    def is_leader(self) -> bool:
        """Whether this process leads, now.

        True only from the acquire until the local deadline of the last
        successful renewal, and only while no loss was seen. It is computed from
        the clock on every call, so it turns false on time even when the renewal
        or campaign thread is stuck or dead. Cheap, and safe from any thread.
        """
        term = self._term
        if term is None:
            return False
        deadline_s, lost = term.state.snapshot()
        return lost is None and self.clock() < deadline_s

    @property
    def token(self) -> int | None:
        """The fencing token of the current term while leading, else None.

        Strictly greater for every new term of this lock, across all processes:
        pass it to the systems you write to, and have them refuse smaller ones.
        """
        term = self._term
        return term.lease.token if term is not None and self.is_leader() else None

    def deadline_in_s(self) -> float | None:
        """Seconds until ``is_leader()`` turns false unless a renewal succeeds."""
        term = self._term
        if term is None or not self.is_leader():
            return None
        return max(0.0, term.state.snapshot()[0] - self.clock())

    def wait_for_leadership(self, timeout_s: float | None = None) -> bool:
        """Block until this process leads, or ``timeout_s`` passes; True if leading.

        Needs the campaign thread (:meth:`start`); on an elector driven by
        :meth:`poll` it only reports whether it leads right now.
        """
        with self._elected:
            return self._elected.wait_for(self.is_leader, timeout_s)

    # --- life cycle -------------------------------------------------------------

    def start(self) -> LeaderElector:
        """Start campaigning in a background thread; make this the current elector.

        Returns the elector, so that ``elector = LeaderElector(...).start()``.

        Raises:
            RuntimeError: it was started before.
        """
        if self._thread is not None:
            raise RuntimeError("a LeaderElector can be started only once")
        self._thread = threading.Thread(
            target=self._campaign, name="leaderrun-elector", daemon=True
        )
        with _Current.lock:
            _Current.elector = self
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop campaigning and step down: ``on_lost("stopped")``, then release.

        Waits up to ``timeout_s`` (None: as long as it takes) for the campaign
        thread, which may be in the middle of a statement. Idempotent.
        """
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        term = self._term
        if term is not None:
            self._end_term(term, LOST_STOPPED)
        if thread is None or not thread.is_alive():
            self._close_session()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        with _Current.lock:
            if _Current.elector is self:
                _Current.elector = None

    def release(self) -> None:
        """Step down now: ``on_lost("released")``, then release the lease.

        The elector does not campaign again for one lease duration plus jitter,
        so that the other replicas (which retry by the time our lease would
        have ended) can take over. Safe from any thread, callbacks included.
        """
        term = self._term
        if term is None:
            return
        self._next_attempt_s = self.clock() + self.timing.lease_s + self.timing.jitter_s
        self._end_term(term, LOST_RELEASED)
        self._wake()

    def __enter__(self) -> LeaderElector:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- one step of the campaign ---------------------------------------------

    def poll(self) -> float:
        """Run one step of the campaign; return seconds until the next is due.

        A follower tries to acquire once its retry is due; a leader ends its term
        if the lease was lost or its deadline passed (calling ``on_lost``). On an
        elector whose thread was not started, a leader also renews when due.
        The campaign thread calls this in a loop; tests call it directly.
        """
        now_s = self.clock()
        term = self._term
        if term is not None:
            deadline_s, lost = term.state.snapshot()
            if lost is None and now_s >= deadline_s:
                lost = (
                    f"{LOST_DEADLINE} (token {term.lease.token}; the database "
                    "was unreachable or too slow, or the renewal thread stalled)"
                )
            if lost is not None:
                self._end_term(term, lost)
                return max(0.0, self._next_attempt_s - self.clock())
            if self._thread is None:
                if now_s >= term.renewer.next_renewal_s():
                    term.renewer.renew_once()
                    return 0.0
                due_s = min(deadline_s, term.renewer.next_renewal_s())
                return max(0.0, due_s - self.clock())
            return max(0.0, deadline_s - self.clock())
        if self._stopping.is_set():
            return 0.0
        if now_s < self._next_attempt_s:
            return self._next_attempt_s - now_s
        self._try_acquire()
        return 0.0 if self._term is not None else self._next_attempt_s - self.clock()

    def _try_acquire(self) -> None:
        """One acquire statement; on success a new term starts."""
        timing = self.timing
        try:
            if self._session is None:
                self._session = self.store.connect()
            t_sent_s = self.clock()
            result = self._session.acquire(self.lock, self.claim, timing.lease_s)
        except Exception as exc:
            self._campaign_failed(exc)
            return
        self._failures = 0
        self.last_error = None
        lease = result.lease
        if lease is None:
            delay_s = retry_delay_s(result.expires_in_s, timing, self.unit_random())
            self._next_attempt_s = self.clock() + delay_s
            log.debug("%s is held; retrying in %.3gs", self.lock, delay_s)
            return
        session, self._session = self._session, None
        elapsed_s = self.clock() - t_sent_s
        if self._stopping.is_set():
            # stop() gave up waiting for this statement; it must not lead now.
            self._give_back(session, lease)
            return
        if elapsed_s >= timing.kill_deadline_s:
            # The grant came so late that its deadline has passed already.
            log.warning(
                "the acquire took %.3gs, past the deadline; giving the lease back",
                elapsed_s,
            )
            self._give_back(session, lease)
            self._next_attempt_s = self.clock()
            return
        state = LeaseState(kill_deadline(t_sent_s, timing))
        renewer = Renewer(
            self.store,
            session,
            lease,
            timing,
            state,
            t_sent_s=t_sent_s,
            clock=self.clock,
            unit_random=self.unit_random,
        )
        term = _Term(lease, state, renewer)
        with self._elected:
            self._term = term
            self._elected.notify_all()
        if self._thread is not None:
            renewer.start()
        log.info(
            "elected leader of %s (fencing token %d)",
            self.lock,
            lease.token,
            extra={"event": "acquired", "token": lease.token},
        )
        self._call(self.on_elected, lease.token)

    def _campaign_failed(self, exc: Exception) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        pause_s = RECONNECT_BACKOFF_S[min(self._failures, len(RECONNECT_BACKOFF_S) - 1)]
        self._failures += 1
        message = getattr(exc, "message", None) or repr(exc)
        self.last_error = message
        if isinstance(exc, DatabaseUnavailableError | ConfigError):
            log.warning("cannot campaign for %s: %s", self.lock, message)
        else:
            log.exception("campaign for %s failed unexpectedly", self.lock)
        self._next_attempt_s = self.clock() + pause_s

    def _end_term(self, term: _Term, reason: str) -> None:
        """End ``term`` once: stop renewing, call ``on_lost``, then release."""
        with self._lock:
            if self._term is not term:
                return  # another thread ended it first
            self._term = None
        term.state.freeze()
        # Ask the renewer to stop, without waiting: on_lost must come at once.
        early = term.renewer.stop(0.0)  # a session only if it has already ended
        quiet = reason in (LOST_RELEASED, LOST_STOPPED)
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "no longer leader of %s: %s",
            self.lock,
            reason,
            extra={"event": "lost", "token": term.lease.token},
        )
        # on_lost first: the application stops its leader-only work, and only
        # then may another replica be let in early (DESIGN rule 8).
        self._call(self.on_lost, reason)
        session = early or term.renewer.stop(self.timing.attempt_budget_s)
        _, lost = term.state.snapshot()
        if lost is None:  # the lease may still be ours in the database
            if session is None:
                try:
                    session = self.store.connect()
                except Exception as exc:
                    log.warning("could not release (the lease will expire): %s", exc)
            if session is not None:
                self._give_back(session, term.lease)
        elif session is not None:
            session.close()
        if not term.renewer.alive():
            term.state.close()  # else a stuck renewal may still write to it

    def _give_back(self, session: LeaseSession, lease: Lease) -> None:
        try:
            if session.release(lease):
                log.info("released %s", lease.lock, extra={"event": "released"})
        except Exception as exc:
            log.warning("could not release (the lease will expire): %s", exc)
        finally:
            session.close()

    def _call(self, callback: Callable[[_T], object] | None, arg: _T) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:
            log.exception("the %s callback failed", getattr(callback, "__name__", ""))

    # --- the campaign thread ----------------------------------------------------

    def _campaign(self) -> None:
        try:
            while not self._stopping.is_set():
                delay_s = self.poll()
                self._sleep(delay_s)
        except BaseException:  # never die silently; is_leader() still times out
            log.exception("the campaign thread failed")
            raise

    def _sleep(self, delay_s: float) -> None:
        """Wait ``delay_s``, or less if the lease is lost or we are woken."""
        if delay_s <= 0:
            return
        fds = [self._wake_r]
        term = self._term
        if term is not None:
            fds.append(term.state.fileno())
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select(fds, [], [], delay_s)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return  # stopped and closed
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __repr__(self) -> str:
        state = "leader" if self.is_leader() else "follower"
        return f"<LeaderElector {str(self.lock)!r} {state}>"
