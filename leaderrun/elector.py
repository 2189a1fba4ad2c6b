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
  the acquire statements, watches the current term, calls ``on_elected`` and
  ``on_lost``, and carries out the end of each term;
- the *renewal thread* (``leaderrun-renewer``, :class:`leaderrun.heartbeat.Renewer`,
  shared with the command line) renews while leading, each attempt on a worker
  thread with a budget, so that a hung socket cannot stall it.

A term is a :class:`leaderrun.holding.HeldLease`, taken, kept and given back as
the command line does (``leaderrun.holding``).

A term *ends* at once, on whichever thread notices or asks (``is_leader()`` is
false from then on), and is then *finished* by the campaign thread: ``on_lost``,
then, for a ``release()`` or ``stop()`` only, the release once no leader-only
work of the term (:meth:`LeaderElector.leading`) is in flight. After a loss the
lease is never released: it runs out in the database ``kill_grace`` (plus a
margin) after ``is_leader()`` turned false, and that is the grace the work in
flight has.

An elector that is never started does nothing by itself: :meth:`poll` runs one
step of the campaign in the caller's thread. Tests drive it that way with a
:class:`leaderrun.testing.FakeClock` and an in-memory store, without sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
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
from leaderrun.holding import Backoff, Grant, HeldLease, make_claim, release_or_expire
from leaderrun.lease import (
    DEFAULT_LEASE_S,
    LockId,
    Timing,
    make_timing,
    parse_lock_id,
    retry_delay_s,
)
from leaderrun.stores.base import LeaseSession, LeaseStore

if TYPE_CHECKING:
    from types import TracebackType

    from leaderrun.stores.postgres import ConnectionFactory

log = logging.getLogger("leaderrun")

_T = TypeVar("_T")

STEP_BUSY_S = 0.05
"""What ``poll()`` returns (seconds) when another thread runs the campaign steps."""

CALL_RECHECK_S = 0.05
"""How often (seconds) a thread waiting for leader-only calls re-reads the clock."""

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

PARAMETERS = {
    "lock_id": "lock_id",
    "dsn": "dsn",
    "schema": "schema",
    "lease_duration": "lease_s",
    "renew_interval": "renew_interval_s",
    "jitter": "jitter_s",
    "kill_grace": "kill_grace_s",
}
"""How errors name the options when they come from the constructor's arguments."""

ElectedCallback = Callable[[int], object]
"""``on_elected(token)``: called once at the start of each term."""

LostCallback = Callable[[str], object]
"""``on_lost(reason)``: called once at the end of each term."""


class _Current:
    """The one piece of process-wide state: the current elector."""

    elector: LeaderElector | None = None
    lock = threading.Lock()


def open_elector_store(
    dsn: str | None,
    env: Mapping[str, str],
    *,
    schema: str = "public",
    connection_factory: ConnectionFactory | None = None,
    attempt_budget_s: float,
) -> LeaseStore:
    """The lease store ``LeaderElector(dsn=...)`` campaigns on, ready to connect.

    ``dsn`` None falls back to ``LEADERRUN_DSN``, then ``DATABASE_URL``, then
    libpq's ``PG*`` variables, all read from ``env`` alone (``{}`` is an empty
    environment). The DSN picks PostgreSQL or SQLite, as on the command line;
    a ``connection_factory`` always means PostgreSQL. Errors name the
    constructor's parameters. psycopg is imported only for PostgreSQL.

    Raises:
        ConfigError: no database given, or an invalid DSN or schema.
    """
    resolved_dsn, _ = resolve_dsn(
        dsn or env.get("LEADERRUN_DSN"), env, PARAMETERS["dsn"]
    )
    schema = check_schema(schema, PARAMETERS["schema"])
    if connection_factory is None:
        from leaderrun.stores import open_store

        return open_store(
            resolved_dsn,
            schema,
            env,
            attempt_budget_s=attempt_budget_s,
            labels=PARAMETERS,
        )
    from leaderrun.stores.postgres import PostgresLeaseStore

    return PostgresLeaseStore(
        "" if dsn is None else resolved_dsn,
        schema,
        attempt_budget_s=attempt_budget_s,
        connection_factory=connection_factory,
        labels=PARAMETERS,
    )


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


@dataclass(eq=False)
class _Term(HeldLease):
    """One stretch of leadership: from the acquire until the lease is handed back.

    The held lease (its state and renewer), plus the campaign's bookkeeping. A
    term *ends* (``is_leader()`` turns false) at once, on any thread; it is
    *finished* (``on_lost``, then the release or not) by the thread that drives
    the campaign, one step at a time (see ``LeaderElector._finish``).
    """

    calls: dict[int, int] = field(default_factory=dict)
    """Leader-only calls in flight, by thread ident (``LeaderElector.leading``)."""
    reason: str | None = None
    """Why the term ended; None while it runs."""
    give_back: bool = False
    """Ended by release() or stop() while still leading: release the lease early."""
    give_up_s: float = 0.0
    """Once the term ended: when the grace for the calls in flight is over."""
    reported: bool = False
    """``on_lost`` was called."""
    session: LeaseSession | None = None
    """The renewer's idle session, kept for the release."""
    renewing: threading.Lock = field(default_factory=threading.Lock)
    """Held while the renewer is stopped: its session is handed over once."""
    finished: threading.Event = field(default_factory=threading.Event)
    """Set once the term is finished: released, or left to expire."""


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
        kill_grace_s: how long leader-only work may run on once
            ``is_leader()`` turned false, before another replica could be
            elected (``--kill-grace``); default ``lease_s / 6``, at most 5 s.
        on_elected: called with the fencing token at the start of every term.
        on_lost: called with a reason at the end of every term.
        clock: CLOCK_BOOTTIME, or a :class:`leaderrun.testing.FakeClock`.
        unit_random: numbers in [0, 1), for the jitter.
        host: this machine's name in the lease row; default the hostname.
        env: where ``dsn=None`` looks for ``LEADERRUN_DSN``, ``DATABASE_URL``
            and libpq's variables; default ``os.environ`` (``{}`` is an empty
            environment).

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
        self.lock: LockId = parse_lock_id(str(lock_id), PARAMETERS["lock_id"])
        self.timing: Timing = make_timing(
            lease_s, renew_interval_s, jitter_s, kill_grace_s, labels=PARAMETERS
        )
        if store is None:
            # The public entry point: the process environment only by default.
            store = open_elector_store(
                dsn,
                os.environ if env is None else env,
                schema=schema,
                connection_factory=connection_factory,
                attempt_budget_s=self.timing.attempt_budget_s,
            )
        self.store: LeaseStore = store
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.clock = clock
        self.unit_random = unit_random
        self.claim = make_claim(
            host or socket.gethostname(),
            f"{os.path.basename(sys.argv[0] or 'python')} (LeaderElector)",
        )
        self.last_error: str | None = None
        """The last campaign failure (database unusable), or None."""
        # _lock guards the term's life cycle: _term, _ending, each term's calls,
        # and _stopping against a term being installed. Never held across I/O
        # or a callback.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a term began, a call ended
        self._term: _Term | None = None  # the term that leads, if any
        self._ending: _Term | None = None  # a term that ended, not yet finished
        # Held by whichever thread runs campaign steps and callbacks (the
        # campaign thread once started): one at a time, never re-entered.
        self._driving = threading.Lock()
        self._session: LeaseSession | None = None
        self._next_attempt_s = -float("inf")
        self._backoff = Backoff()
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
        successful renewal, and only while no loss was seen and the term was
        not ended (``release()``, ``stop()``). It is computed from the clock on
        every call, so it turns false on time even when the renewal or campaign
        thread is stuck or dead. Cheap, and safe from any thread.
        """
        term = self._term
        return term is not None and self._leads(term)

    @property
    def token(self) -> int | None:
        """The fencing token of the current term while leading, else None.

        Strictly greater for every new term of this lock, across all processes:
        pass it to the systems you write to, and have them refuse smaller ones.
        """
        term = self._term
        return term.lease.token if term is not None and self._leads(term) else None

    def deadline_in_s(self) -> float | None:
        """Seconds until ``is_leader()`` turns false unless a renewal succeeds."""
        term = self._term
        if term is None or not self._leads(term):
            return None
        return max(0.0, term.state.snapshot()[0] - self.clock())

    def wait_for_leadership(self, timeout_s: float | None = None) -> bool:
        """Block until this process leads, or ``timeout_s`` passes; True if leading.

        Needs the campaign thread (:meth:`start`); on an elector driven by
        :meth:`poll` it only reports whether it leads right now.
        """
        with self._changed:
            return self._changed.wait_for(self.is_leader, timeout_s)

    @contextlib.contextmanager
    def leading(self) -> Iterator[int | None]:
        """Run a ``with`` block as leader-only work of the current term.

        Yields the fencing token if this process leads, else None (and nothing
        is counted). While such a block runs, :meth:`release` and :meth:`stop`
        do not release the lease: they wait for it, at most ``kill_grace_s``
        after ``is_leader()`` turned false, and past that leave the lease to
        expire. ``@leader_only`` runs each call this way; use it directly for
        work that is not one function call::

            with elector.leading() as token:
                if token is not None:
                    write_report(token)
        """
        me = threading.get_ident()
        with self._lock:
            term = self._term
            if term is not None and self._leads(term):
                term.calls[me] = term.calls.get(me, 0) + 1
            else:
                term = None
        if term is None:
            yield None
            return
        try:
            yield term.lease.token
        finally:
            with self._lock:
                if term.calls[me] > 1:
                    term.calls[me] -= 1
                else:
                    del term.calls[me]
                waited_for = term.reason is not None and not term.calls
                if waited_for:
                    self._changed.notify_all()
            if waited_for:
                self._wake()  # the campaign thread may be waiting to release

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

        ``is_leader()`` is false from the start, and the renewal thread has
        ended (or, if wedged, can no longer count) when this returns. The
        campaign thread calls ``on_lost``, waits for leader-only work in flight
        (at most ``kill_grace_s``) and releases; this waits for it up to
        ``timeout_s`` (None: ``kill_grace_s`` plus three attempt budgets). A
        campaign thread stuck in a callback finishes the term when it returns;
        if it never does, the lease expires. From a callback or a leader-only
        call it does not wait for itself. Idempotent.
        """
        with self._lock:
            self._stopping.set()
            term = self._term
            ended = term is not None and self._step_down(term, LOST_STOPPED, True)
            ending = self._ending
        if ended and term is not None:
            self._stepped_down(term)
        self._wake()
        if ending is not None:
            # The renewal thread ends now, whatever the campaign thread is doing.
            self._stop_renewing(ending, self.timing.attempt_budget_s)
        thread = self._thread
        if thread is None:
            self._finish_here(ending, closing=True)
        elif thread is not threading.current_thread() and not (
            ending is not None and self._calls_here(ending)
        ):
            bound_s = self.step_down_bound_s if timeout_s is None else timeout_s
            thread.join(bound_s)
            if thread.is_alive():
                log.warning(
                    "the campaign thread of %s is still busy after %.3gs (in a "
                    "callback or a statement); it finishes when that returns",
                    self.lock,
                    bound_s,
                )
        if thread is None or not thread.is_alive():
            self._close_wake_pipe()  # else the campaign thread closes it at its end
        with _Current.lock:
            if _Current.elector is self:
                _Current.elector = None

    def release(self) -> None:
        """Step down now: ``on_lost("released")``, then release the lease.

        ``is_leader()`` is false when this returns. The lease is released once
        ``on_lost`` returned and no leader-only work of the term is in flight
        (waiting at most ``kill_grace_s``; past that it is left to expire). On
        a started elector, this waits for that up to :attr:`step_down_bound_s`,
        except from a callback or a leader-only call, where it returns at once
        and the campaign thread finishes the term afterwards. The elector does
        not campaign again for one lease duration plus jitter, so that the
        other replicas (which retry by the time our lease would have ended)
        can take over. Safe from any thread.
        """
        with self._lock:
            term = self._term
            if term is None:
                return
            self._next_attempt_s = (
                self.clock() + self.timing.lease_s + self.timing.jitter_s
            )
            self._step_down(term, LOST_RELEASED, True)
        self._stepped_down(term)
        self._wake()
        if self._thread is None:
            self._finish_here(term)
        elif threading.current_thread() is not self._thread and not self._calls_here(
            term
        ):
            term.finished.wait(self.step_down_bound_s)

    @property
    def step_down_bound_s(self) -> float:
        """How long ``release()`` and ``stop()`` wait for a term to be finished.

        ``kill_grace_s`` for ``on_lost`` and the leader-only work in flight, one
        attempt budget for the renewal thread to end, two for the release.
        """
        return self.timing.kill_grace_s + 3 * self.timing.attempt_budget_s

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
        if the lease was lost or its deadline passed (calling ``on_lost``), and
        an ended term is finished (released, or left to expire). On an elector
        whose thread was not started, a leader also renews when due. The
        campaign thread calls this in a loop; tests call it directly. Only one
        thread runs steps at a time: from a callback, or from another thread
        than the campaign thread of a started elector, it does nothing and
        returns :data:`STEP_BUSY_S`.
        """
        if self._thread is not None and threading.current_thread() is not self._thread:
            return STEP_BUSY_S
        if not self._driving.acquire(blocking=False):
            return STEP_BUSY_S
        try:
            return self._step()
        finally:
            self._driving.release()

    def _step(self) -> float:
        ending = self._ending
        if ending is not None:
            return self._finish(ending, block=False)
        term = self._term
        if term is not None:
            if not self._leads(term):
                with self._lock:
                    ended = self._step_down(term, self._loss(term), False)
                if ended:
                    self._stepped_down(term)
                    return self._finish(term, block=False)
                return 0.0
            deadline_s, _ = term.state.snapshot()
            if self._thread is None:
                if self.clock() >= term.renewer.next_renewal_s():
                    term.renewer.renew_once()
                    return 0.0
                due_s = min(deadline_s, term.renewer.next_renewal_s())
                return max(0.0, due_s - self.clock())
            return max(0.0, deadline_s - self.clock())
        if self._stopping.is_set():
            return 0.0
        now_s = self.clock()
        if now_s < self._next_attempt_s:
            return self._next_attempt_s - now_s
        self._try_acquire()
        if self._term is not None or self._ending is not None:
            return 0.0
        return max(0.0, self._next_attempt_s - self.clock())

    def _try_acquire(self) -> None:
        """One acquire statement; on success a new term starts."""
        timing = self.timing
        try:
            if self._session is None:
                self._session = self.store.connect()
            t_sent_s = self.clock()  # local-deadline: before it is sent
            result = self._session.acquire(self.lock, self.claim, timing.lease_s)
        except Exception as exc:  # StatementTimeoutError included: retried
            self._campaign_failed(exc)
            return
        self._backoff.reset()
        self.last_error = None
        if result.lease is None:
            delay_s = retry_delay_s(result.expires_in_s, timing, self.unit_random())
            self._next_attempt_s = self.clock() + delay_s
            log.debug("%s is held; retrying in %.3gs", self.lock, delay_s)
            return
        grant = Grant(result.lease, t_sent_s, self._session)
        self._session = None  # the term's now, or the release's
        if not grant.usable(self.clock(), timing):
            release_or_expire(self.store, grant.session, grant.lease, timing)
            self._next_attempt_s = self.clock()
            return
        self._start_term(grant)

    def _start_term(self, grant: Grant) -> None:
        """Lead with ``grant``: a term starts, unless ``stop()`` came first."""
        term = _Term.of(
            grant,
            self.store,
            self.timing,
            clock=self.clock,
            unit_random=self.unit_random,
        )
        with self._changed:
            # Checked with the term's start under one lock: a stop() either
            # comes first and no term starts, or comes after and ends it.
            stopping = self._stopping.is_set()
            if not stopping:
                self._term = term
                if self._thread is not None:
                    term.start_renewing()
                self._changed.notify_all()
        if stopping:
            release_or_expire(self.store, grant.session, grant.lease, self.timing)
            term.close()
            return
        lease = grant.lease
        log.info(
            "elected leader of %s (fencing token %d)",
            self.lock,
            lease.token,
            extra={"event": "acquired", "token": lease.token},
        )
        # Even if the term has ended meanwhile: on_elected and on_lost come in
        # pairs, for every term is_leader() could have reported.
        self._call(self.on_elected, lease.token)

    def _campaign_failed(self, exc: Exception) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        pause_s = self._backoff.next_pause_s()
        message = getattr(exc, "message", None) or repr(exc)
        self.last_error = message
        if isinstance(exc, DatabaseUnavailableError | ConfigError):
            log.warning("cannot campaign for %s: %s", self.lock, message)
        else:
            log.exception("campaign for %s failed unexpectedly", self.lock)
        self._next_attempt_s = self.clock() + pause_s

    # --- ending a term ------------------------------------------------------------

    def _leads(self, term: _Term) -> bool:
        deadline_s, lost = term.state.snapshot()
        return lost is None and self.clock() < deadline_s

    def _loss(self, term: _Term) -> str:
        """Why ``term`` stopped leading by itself: a reported loss, or the deadline."""
        _, lost = term.state.snapshot()
        return lost or (
            f"{LOST_DEADLINE} (token {term.lease.token}; the database was "
            "unreachable or too slow, or the renewal thread stalled)"
        )

    def _step_down(self, term: _Term, reason: str, requested: bool) -> bool:
        """End ``term`` now, if it is the current one; the caller holds ``_lock``.

        ``requested`` (release, stop) gives the lease back early, but only if
        the term still led: a term that had ended by itself (a passed deadline,
        a loss) is a loss, whoever notices it first. After a loss the lease is
        never released: the database lets nobody in before it runs out, which
        is the grace the leader-only work in flight has to finish in; and this
        process stays out of the race until then.
        """
        if self._term is not term:
            return False
        now_s = self.clock()
        leading = self._leads(term)
        self._term = None
        self._ending = term
        term.reason = reason if leading or not requested else self._loss(term)
        term.give_back = requested and leading
        term.give_up_s = now_s + self.timing.kill_grace_s
        term.state.freeze()  # no renewal may count from now on
        if not term.give_back:
            self._next_attempt_s = max(self._next_attempt_s, self._retry_after(term))
        return True

    def _retry_after(self, term: _Term) -> float:
        """When to campaign again after a loss: once the lease can have run out.

        The deadline is ``kill_deadline_s`` after the last renewal that counted
        was sent, and the database ran that renewal no earlier than it was
        sent; plus the jitter every waiting contender adds.
        """
        deadline_s, _ = term.state.snapshot()
        ends_s = deadline_s - self.timing.kill_deadline_s + self.timing.lease_s
        now_s = self.clock()
        return now_s + retry_delay_s(ends_s - now_s, self.timing, self.unit_random())

    def _stepped_down(self, term: _Term) -> None:
        """What follows a step-down on the thread that made it: log, stop renewing."""
        quiet = term.reason in (LOST_RELEASED, LOST_STOPPED)
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "no longer leader of %s: %s",
            self.lock,
            term.reason,
            extra={"event": "lost", "token": term.lease.token},
        )
        # Ask, without waiting (and not behind another thread already waiting).
        if term.renewing.acquire(blocking=False):
            try:
                session = term.renewer.stop(0.0)
                if session is not None:
                    term.session = session
            finally:
                term.renewing.release()

    def _finish_here(self, term: _Term | None, *, closing: bool = False) -> None:
        """Finish ``term`` on this thread, if it may run campaign steps now.

        For an elector driven by ``poll()``; from inside a step (a callback, or
        a ``poll()`` on another thread) the next ``poll()`` finishes it instead.
        ``closing`` also closes the campaign's session, which only a thread
        running the steps may touch.
        """
        if not self._driving.acquire(blocking=False):
            return
        try:
            if term is not None and self._ending is term:
                self._finish(term, block=True)
            if closing:
                self._close_session()
        finally:
            self._driving.release()

    def _calls_here(self, term: _Term) -> bool:
        """Whether this thread is inside leader-only work of ``term``."""
        with self._lock:
            return threading.get_ident() in term.calls

    def _finish(self, term: _Term, *, block: bool) -> float:
        """Carry an ended term on: ``on_lost``, the calls in flight, the release.

        Runs on the thread that drives the campaign, never inside a callback.
        ``block`` waits here for the calls of other threads (up to the grace);
        otherwise, while any remain, it returns how long until the grace is
        over, and a later step goes on. Returns seconds until the next step.
        """
        if not term.reported:
            term.reported = True
            self._call(self.on_lost, term.reason or "")
        give_back = term.give_back
        if give_back:
            if block:
                self._wait_for_calls(term)
            with self._lock:
                running = sum(term.calls.values())
            if running:
                left_s = term.give_up_s - self.clock()
                if left_s > 0:
                    return left_s
                log.warning(
                    "%d leader-only call(s) of %s still running %.3gs after the "
                    "term ended; not releasing (the lease will expire)",
                    running,
                    self.lock,
                    self.timing.kill_grace_s,
                )
                give_back = False
        self._stop_renewing(term, self.timing.attempt_budget_s)
        with term.renewing:
            session, term.session = term.session, None
        if give_back:
            # Only once on_lost returned and no leader-only work of the term
            # runs: the library's release-last.
            release_or_expire(self.store, session, term.lease, self.timing)
        elif session is not None:
            session.close()
        term.close()
        with self._lock:
            self._ending = None
        term.finished.set()
        if self._stopping.is_set():
            return 0.0
        return max(0.0, self._next_attempt_s - self.clock())

    def _wait_for_calls(self, term: _Term) -> None:
        """Wait until no other thread runs leader-only work of ``term``.

        At most until its grace is over on the elector's clock, and at most the
        grace in all (a fake clock may stand still).
        """
        me = threading.get_ident()
        waited_s = 0.0
        with self._changed:
            while any(ident != me for ident in term.calls):
                left_s = min(
                    term.give_up_s - self.clock(),
                    self.timing.kill_grace_s - waited_s,
                )
                if left_s <= 0:
                    return
                step_s = min(left_s, CALL_RECHECK_S)
                self._changed.wait(step_s)
                waited_s += step_s

    def _stop_renewing(self, term: _Term, timeout_s: float) -> None:
        """Stop the renewals, waiting up to ``timeout_s``; keep the idle session."""
        with term.renewing:
            session = term.renewer.stop(timeout_s)
            if session is not None:
                term.session = session

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
            while True:
                delay_s = self.poll()
                with self._lock:
                    if self._stopping.is_set() and self._term is self._ending is None:
                        break
                self._sleep(delay_s)
        except BaseException:  # never die silently; is_leader() still times out
            log.exception("the campaign thread failed")
            raise
        self._close_session()
        self._close_wake_pipe()

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
        # Under the lock: stop() closes the pipe, and its fd number may be reused.
        with self._lock:
            if self._wake_w < 0:
                return  # stopped and closed
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def _close_wake_pipe(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __repr__(self) -> str:
        state = "leader" if self.is_leader() else "follower"
        return f"<LeaderElector {str(self.lock)!r} {state}>"
