"""``leaderrun run``: take the lease, run the command under supervision, release.

The order of the steps is the safety argument (rules ``local-deadline`` to
``release-last`` in docs/safety.md):

1. signal handlers first, so a leaderrun still waiting can be cancelled;
2. acquire in the main thread, timing from just before the statement is sent;
3. start the child from the main thread, before any other thread exists;
4. start the renewal thread, then supervise from the main thread;
5. release only once the child's whole group is gone.
"""

from __future__ import annotations

import logging
import math
import random
import shlex
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from leaderrun.clock import boottime
from leaderrun.config import RunSettings, WatchdogMode
from leaderrun.errors import (
    EXIT_INTERNAL,
    EXIT_LEASE_LOST,
    EXIT_TIMEOUT,
    BusyError,
    CancelledBySignalError,
    DatabaseUnavailableError,
    InvariantError,
    LeaderrunError,
    SchemaMissingError,
    SystemResourceError,
)
from leaderrun.handoff import Handoff
from leaderrun.holding import (
    Backoff,
    Grant,
    HeldLease,
    make_claim,
    release,
    release_or_expire,
)
from leaderrun.lease import Lease, retry_delay_s
from leaderrun.runs import RunEnd, RunOutcome, classify
from leaderrun.stores.base import AcquireResult, LeaseSession, LeaseStore
from leaderrun.supervisor import (
    CANCELLING_SIGNALS,
    Child,
    Outcome,
    SignalInbox,
    Standby,
    Supervisor,
    become_subreaper,
    exit_status,
    job_control_ignored,
    pidfd_supported,
    privilege_warning,
    resolve_command,
)
from leaderrun.watchdog import WATCHDOG_LATE_S, Watchdog

if TYPE_CHECKING:
    from leaderrun.capture import Capture
    from leaderrun.ping import Pinger

log = logging.getLogger("leaderrun")

CANCELLED = "cancelled by a signal while waiting for the lock; nothing ran"
"""What a run cancelled before its command started says."""


def child_environment(
    env: Mapping[str, str],
    lease: Lease,
    settings: RunSettings,
    window_start: datetime | None = None,
) -> dict[str, str]:
    """The child's environment: ours, less inherited ``LEADERRUN_*``, plus the lease.

    Inherited ``LEADERRUN_*`` values are dropped rather than overridden one by
    one: ``LEADERRUN_DSN`` may carry a password, and a stale
    ``LEADERRUN_FENCING_TOKEN`` from an outer leaderrun must not survive.
    """
    child = {k: v for k, v in env.items() if not k.startswith("LEADERRUN_")}
    child.update(
        LEADERRUN_HELD="1",
        LEADERRUN_LOCK_ID=str(lease.lock),
        LEADERRUN_FENCING_TOKEN=str(lease.token),
        LEADERRUN_HOLDER=lease.holder,
        LEADERRUN_LEASE_DURATION=f"{settings.timing.lease_s:g}",
    )
    if window_start is not None and settings.once_per is not None:
        # The operators' output module, needed by a run only for its slot.
        from leaderrun.views import iso_utc

        start_s = window_start.timestamp()
        child["LEADERRUN_SLOT"] = settings.once_per.local(start_s).isoformat()
        # The same instant in UTC, as the first releases named it.
        child["LEADERRUN_WINDOW"] = iso_utc(window_start) or ""
    return child


class _Contender:
    """The acquire loop's state, and the one owner of its session.

    Used as a ``with`` block: on leaving it the session is closed, unless a
    grant took it along (:meth:`hand_over`).
    """

    def __init__(self, give_up_s: float) -> None:
        self.give_up_s = give_up_s
        """When waiting for the lock ends (without ``--wait``: at the start)."""
        self.backoff = Backoff()
        self.t_sent_s = 0.0
        """When the last acquire statement was sent, on the run's clock."""
        self._session: LeaseSession | None = None

    def __enter__(self) -> _Contender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def has_session(self) -> bool:
        """Whether the contender has a session open (not yet handed over)."""
        return self._session is not None

    @property
    def session(self) -> LeaseSession:
        """The open session; there is one from the connect until the hand-over."""
        if self._session is None:
            raise InvariantError("the acquire loop used its session while it had none")
        return self._session

    def own(self, session: LeaseSession) -> None:
        """Take ``session`` as the one to ask on, closing the previous one."""
        self.close()
        self._session = session

    def hand_over(self) -> LeaseSession:
        """Give the session up to a grant or a release, which close it."""
        session, self._session = self.session, None
        return session

    def close(self) -> None:
        """Close the session, if the contender still has one."""
        session, self._session = self._session, None
        if session is not None:
            session.close()


class Run:
    """One invocation of ``leaderrun run``.

    Args:
        settings: the validated options.
        store: where the lease lives.
        env: leaderrun's own environment (the child's is derived from it).
        host: this machine's name, recorded in the lease row.
        clock: CLOCK_BOOTTIME, or a fake.
        unit_random: numbers in [0, 1), for jitter.
        listen_store: where a ``--wait`` contender listens (``--listen-dsn``),
            if not on its lease session.
    """

    def __init__(
        self,
        settings: RunSettings,
        store: LeaseStore,
        env: Mapping[str, str],
        *,
        host: str,
        clock: Callable[[], float] = boottime,
        unit_random: Callable[[], float] = random.random,
        listen_store: LeaseStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.listen_store = listen_store
        self.env = env
        self.clock = clock
        self.unit_random = unit_random
        self.claim = make_claim(host, shlex.join(settings.command))
        self.capture: Capture | None = None
        """``--capture-output``: the command's pipes and the tail of its output."""
        self.pinger: Pinger | None = None
        """``--ping``: the monitor told of the command's start and end."""

    def __call__(self) -> int:
        """Run to the end and return leaderrun's exit status.

        Raises:
            LeaderrunError: the command did not start (busy, cancelled,
                database unavailable, command not found); its ``exit_code`` says why.
        """
        # Everything the run needs is found out before the lease is taken: a
        # typo in the command should not take the lock from a working node, nor
        # a kernel without pidfds or a pids limit leave a started child alone.
        path = resolve_command(self.settings.command, self.env)
        warning = privilege_warning(path)
        if warning is not None:
            log.warning("%s", warning)
        pidfds = self._probe_pidfds()
        self._prepare_monitoring()
        with SignalInbox() as inbox:
            self._splay(inbox)
            watchdog = self._start_watchdog()
            standby = self._fork_standby(path)
            try:
                acquired = self.acquire(inbox)
                return self.supervise(
                    acquired, inbox, watchdog, pidfds=pidfds, standby=standby
                )
            finally:
                standby.discard()  # unless the command runs in it
                if watchdog is not None:
                    watchdog.close()
                if self.capture is not None:
                    self.capture.close(0.0)  # a run that never started the command

    def _prepare_monitoring(self) -> None:
        """Make the pipes ``--capture-output`` needs, and the ``--ping`` sender.

        Imported only when asked for, so a plain run pays nothing for them.
        """
        s = self.settings
        if s.capture_bytes is not None:
            from leaderrun.capture import Capture

            try:
                self.capture = Capture(s.capture_bytes)
            except OSError as exc:
                raise SystemResourceError(
                    f"cannot make the pipes for --capture-output "
                    f"({exc.strerror or exc}); nothing ran"
                ) from None
        if s.ping_url is not None:
            from leaderrun.ping import Pinger

            self.pinger = Pinger(s.ping_url, self.clock)

    def _splay(self, inbox: SignalInbox) -> None:
        """``--splay``: a random pause before the first acquire; a signal cancels it.

        So that a fleet's identical crontabs neither reach the database in the
        same millisecond nor always let the node with the fastest clock win.
        """
        pause_s = self.settings.splay_s * self.unit_random()
        if pause_s <= 0:
            return
        log.debug("splay: trying %s in %.3gs", self.settings.lock, pause_s)
        until_s = self.clock() + pause_s
        while (left_s := until_s - self.clock()) > 0:
            cancelling = [n for n in inbox.wait(left_s) if n in CANCELLING_SIGNALS]
            if cancelling:
                raise CancelledBySignalError(
                    cancelling[0], "cancelled by a signal during --splay; nothing ran"
                )

    def _fork_standby(self, path: str) -> Standby:
        """Fork the command's process now, to exec it the moment the lease is ours.

        After the watchdog (so that it is not the standby's sibling in a way
        that matters: both are ours) and before the first statement, so the
        fork overlaps nothing on the hand-off path. A run that cannot fork
        takes nothing.
        """
        capture = self.capture
        s = self.settings
        # All of the command's environment but the grant's own (the token).
        known = child_environment(self.env, Lease(s.lock, self.claim.holder, 0), s)
        try:
            return Standby(
                path,
                s.command,
                stdout=None if capture is None else capture.child_stdout,
                stderr=None if capture is None else capture.child_stderr,
                env=known,
            )
        except OSError as exc:
            raise SystemResourceError(
                f"cannot fork the command's process ({exc.strerror or exc}); "
                "nothing ran"
            ) from None

    def _probe_pidfds(self) -> bool:
        try:
            supported = pidfd_supported()
        except OSError as exc:
            raise SystemResourceError(
                f"cannot open a pidfd ({exc.strerror or exc}); nothing ran"
            ) from None
        if not supported:
            log.debug("no pidfds here: the command's exit is seen at each tick")
        return supported

    def _start_watchdog(self) -> Watchdog | None:
        """Fork the watchdog, before the lease is taken.

        A run that requires one and cannot have one then takes nothing.
        """
        mode = self.settings.watchdog
        if mode is WatchdogMode.off:
            return None
        watchdog = Watchdog(self.settings.timing.kill_grace_s, self.clock)
        try:
            watchdog.start()
        except OSError as exc:
            if mode is WatchdogMode.required:
                raise SystemResourceError(
                    f"cannot start the watchdog ({exc.strerror or exc}) and "
                    "--watchdog required was given; nothing ran"
                ) from None
            log.error(
                "cannot start the watchdog (%s); running without it: a leaderrun "
                "paused past its deadline is not covered",
                exc.strerror or exc,
            )
            return None
        log.debug("watchdog started (pid %s)", watchdog.pid)
        return watchdog

    def acquire(self, inbox: SignalInbox) -> Grant:
        """Take the lease, waiting for it if asked; cancellable by a signal.

        Raises:
            BusyError: held elsewhere (and the wait, if any, timed out).
            CancelledBySignalError: a signal arrived first.
            DatabaseUnavailableError: the database could not be used.
        """
        handoff = Handoff(
            self.settings.lock,
            self.claim.holder,
            enabled=self.settings.wait,
            listen_store=self.listen_store,
        )
        try:
            return self._acquire(inbox, handoff)
        finally:
            handoff.close()  # before the child starts: it needs no LISTEN

    def _acquire(self, inbox: SignalInbox, handoff: Handoff) -> Grant:
        """Ask until the lease is granted; each step is a method, and owns no session.

        The contender owns the session: whichever way this ends but a grant (a
        busy lock, a signal, a failure), it closes it.
        """
        with _Contender(self._give_up_s()) as contender:
            self._connect(contender, inbox)
            if self.settings.wait:
                # Before the first attempt: the LISTEN rides on it (one round
                # trip), or the --listen-dsn connection hears any release after.
                with inbox.cancelling():
                    handoff.listen(contender.session)
            try:
                while True:
                    self._cancel_on(inbox.take(), contender)
                    result = self._ask(contender, inbox)
                    if result is None:
                        continue  # the database failed, we reconnected: ask again
                    if result.lease is None:
                        self._wait_turn(contender, inbox, handoff, result)
                        continue
                    grant = self._take(
                        contender, inbox, result.lease, result.window_start
                    )
                    if grant is not None:
                        return grant
                    # Granted too late to use, and given back: ask again.
            except (BusyError, CancelledBySignalError):
                if self.settings.wait:
                    self._leave_queue(contender)
                raise

    def _leave_queue(self, contender: _Contender) -> None:
        """A waiter that gives up leaves the queue; best effort, bounded.

        So that the next in line need not wait for this place to lapse.
        """
        if contender.has_session:
            try:
                contender.session.leave_queue(self.settings.lock, self.claim)
            except DatabaseUnavailableError as exc:
                log.debug("could not leave the queue (the place lapses): %s", exc)

    def _give_up_s(self) -> float:
        """When waiting for the lock ends: at once without ``--wait``."""
        s = self.settings
        started_s = self.clock()
        if not s.wait:
            return started_s
        if s.wait_timeout_s is None:
            return math.inf
        return started_s + s.wait_timeout_s

    def _connect(
        self,
        contender: _Contender,
        inbox: SignalInbox,
        error: DatabaseUnavailableError | None = None,
    ) -> None:
        """Open the contender's session; after a failure, back off first.

        Each failure (``error``: the one that brought us here) is retried
        after a pause until the wait is over, and then raised: without
        ``--wait`` at once, so an unreachable database exits 69. A waiter
        started mid-failover (every host down, or a standby) retries.
        """
        contender.close()
        while True:
            if error is not None:
                self._back_off(contender, inbox, error)
            try:
                with inbox.cancelling():
                    session = self.store.connect()
            except DatabaseUnavailableError as exc:
                error = exc
                continue
            contender.own(session)
            return

    def _back_off(
        self,
        contender: _Contender,
        inbox: SignalInbox,
        error: DatabaseUnavailableError,
    ) -> None:
        """Pause after ``error`` before the next try, or raise it: the wait is over."""
        if self.clock() >= contender.give_up_s:
            raise error
        pause_s = contender.backoff.next_pause_s()
        log.warning("%s; retrying in %gs", error.message, pause_s)
        left_s = max(0.0, contender.give_up_s - self.clock())
        self._cancel_on(inbox.wait(min(pause_s, left_s)), contender)

    def _ask(self, contender: _Contender, inbox: SignalInbox) -> AcquireResult | None:
        """Send one acquire statement; None if it failed and we reconnected.

        Raises:
            SchemaMissingError: there is no lease table to use.
            DatabaseUnavailableError: it failed, and the wait (if any) is over.
        """
        s = self.settings
        log.debug("acquiring %s", s.lock)
        contender.t_sent_s = self.clock()  # local-deadline: before it is sent
        try:
            # A signal while the statement waits (a row lock, a frozen
            # server) cancels it and ends the run with nothing started.
            with inbox.cancelling():
                result = contender.session.acquire(
                    s.lock,
                    self.claim,
                    s.timing.lease_s,
                    once_per=s.once_per,
                    history_keep=s.history_keep,
                    queued=s.wait,
                )
        except SchemaMissingError:
            raise  # waiting cannot create the table
        except DatabaseUnavailableError as exc:
            self._connect(contender, inbox, exc)
            return None
        contender.backoff.reset()
        return result

    def _take(
        self,
        contender: _Contender,
        inbox: SignalInbox,
        lease: Lease,
        window_start: datetime | None,
    ) -> Grant | None:
        """The lease was granted: take it, unless a signal came or the grant is late.

        A late grant (``local-deadline``) is released unused, its run closed as
        lost; then None, to ask again, or without ``--wait`` an error.
        """
        s = self.settings
        self._cancel_on(inbox.take(), contender, lease)
        grant = Grant(lease, contender.t_sent_s, contender.session, window_start)
        now_s = self.clock()
        if grant.usable(now_s, s.timing):
            log.info(
                "acquired %s (fencing token %d)",
                s.lock,
                lease.token,
                extra={"event": "acquired", "token": lease.token},
            )
            contender.hand_over()
            return grant
        release(grant.session, lease, self._unstarted)
        if not s.wait:
            raise DatabaseUnavailableError(
                f"the database took {now_s - grant.t_sent_s:.3g}s to grant the lease, "
                "longer than the kill deadline allows; use a longer --lease-duration"
            )
        return None

    def _wait_turn(
        self,
        contender: _Contender,
        inbox: SignalInbox,
        handoff: Handoff,
        result: AcquireResult,
    ) -> None:
        """Held elsewhere: give up if the wait is over, else sleep until a retry.

        Raises:
            BusyError: the ``--once-per`` window already ran, or the wait is over.
        """
        s = self.settings
        if result.window_done:
            # Waiting cannot help: the window stays done until it ends.
            raise BusyError(self._window_message(result))
        now_s = self.clock()
        if now_s >= contender.give_up_s:
            raise BusyError(self._busy_message(result))
        with inbox.cancelling():
            listening = handoff.listen(contender.session)
        if listening:
            return  # ask again at once: see Handoff.listen
        delay_s = retry_delay_s(
            result.expires_in_s,
            s.timing,
            self.unit_random(),
            turn_in_s=result.turn_in_s,
            queued=s.wait,
        )
        ahead = "" if result.turn_in_s is None else " (another waiter is ahead)"
        log.debug("%s is held; retrying in %.3gs%s", s.lock, delay_s, ahead)
        if handoff.wait(inbox.fileno(), min(delay_s, contender.give_up_s - now_s)):
            log.debug("%s was released; trying now", s.lock)

    def supervise(
        self,
        grant: Grant,
        inbox: SignalInbox,
        watchdog: Watchdog | None = None,
        *,
        pidfds: bool = True,
        standby: Standby | None = None,
    ) -> int:
        """Start the child, renew while it runs, stop it if the lease goes; release.

        From the moment the child exists, any failure of leaderrun's own stops
        its whole group and releases the lease (exit 125): a child is never left
        running unsupervised with the lease held.
        """
        # Before the child: nothing that may fail comes between its fork and
        # the supervisor. The renewer owns the grant's session from here on.
        held = HeldLease.of(
            grant,
            self.store,
            self.settings.timing,
            clock=self.clock,
            unit_random=self.unit_random,
        )
        child = self._start_child(grant, held, watchdog, standby)
        outcome = self._run_child(child, held, inbox, watchdog, pidfds=pidfds)
        self._disarm(watchdog)
        # The group is gone, so the pipes are at their end: the tail is complete
        # before the release, which stores it with the run.
        output = None if self.capture is None else self.capture.finish()
        self._release_last(held, outcome, output)
        child.close()
        held.close()
        status = self._exit_status(outcome)
        self._report(status, output)
        return status

    def _report(self, status: int, output: str | None) -> None:
        """After the release: ping the end, and let the relays finish; bounded.

        Both go on other threads; the end ping and the relays' last writes
        overlap, and the whole takes at most ``PING_BOUND_S``
        (``RELAY_FLUSH_S`` without ``--ping``). The status is not changed.
        """
        if self.pinger is not None:
            self.pinger.end(status, output.encode() if output else None)
        if self.capture is not None:
            self.capture.close()
        if self.pinger is not None:
            self.pinger.wait()

    def _start_child(
        self,
        grant: Grant,
        held: HeldLease,
        watchdog: Watchdog | None,
        standby: Standby | None = None,
    ) -> Child:
        """Exec the command in ``standby`` (or fork it now); if it cannot, release.

        Raises:
            LeaderrunError: the command did not start (not found, not
                executable, no resources); the lease was released unused.
        """
        s = self.settings
        # After the watchdog was forked, so that it is not one of our children.
        become_subreaper()
        env = child_environment(self.env, grant.lease, s, grant.window_start)
        helpers = () if watchdog is None or watchdog.pid is None else (watchdog.pid,)
        capture = self.capture
        deadline_s, _ = held.state.snapshot()
        try:
            return Child(
                s.command,
                env,
                helpers,
                stdout=None if capture is None else capture.child_stdout,
                stderr=None if capture is None else capture.child_stderr,
                standby=standby,
                # Never a command started after the lease's kill deadline.
                within_s=deadline_s - self.clock(),
            )
        except LeaderrunError as exc:
            # A run that failed to start, recorded as failed; nothing to hold.
            end = self._end(RunOutcome.failed, exc.exit_code, hold=False)
            session = held.renewer.stop(0.0)  # never started: it hands it back
            release_or_expire(self.store, session, grant.lease, s.timing, end)
            held.close()
            # This node took the lease to run it: the monitor hears of the failure.
            self._report(exc.exit_code, None)
            raise

    def _run_child(
        self,
        child: Child,
        held: HeldLease,
        inbox: SignalInbox,
        watchdog: Watchdog | None,
        *,
        pidfds: bool,
    ) -> Outcome:
        """Renew, and supervise from the main thread until the group is gone."""
        s = self.settings
        runtime_deadline_s = (
            None if s.max_runtime_s is None else self.clock() + s.max_runtime_s
        )
        supervisor = Supervisor(
            child,
            inbox,
            held.state,
            s.timing.kill_grace_s,
            self.clock,
            runtime_deadline_s=runtime_deadline_s,
            watchdog=watchdog,
            watchdog_required=s.watchdog is WatchdogMode.required,
        )
        with job_control_ignored():
            try:
                if watchdog is not None:
                    deadline_s, _ = held.state.snapshot()
                    watchdog.arm(child.pgid, deadline_s + WATCHDOG_LATE_S)
                if pidfds:
                    child.watch()
                # Only now may another thread start: the child was forked from the
                # main thread, whose life its parent-death signal is tied to
                # (child-dies-with-us).
                if self.capture is not None:
                    self.capture.spawned()
                held.start_renewing()
                if self.pinger is not None:
                    self.pinger.start()  # on its own thread: never a wait here
                return supervisor.run()
            except Exception as exc:
                # Stop first (a signal), then say why: nothing may wait before it.
                supervisor.stop(f"leaderrun failed after the command started: {exc}")
                log.exception("leaderrun failed after the command started")
                return Outcome(
                    child.returncode,
                    failure=str(exc),
                    unstoppable=supervisor.unstoppable,
                )

    def _release_last(
        self, held: HeldLease, outcome: Outcome, output: str | None = None
    ) -> None:
        """The group is gone: stop renewing and release, closing the run.

        Not while a process of the command that we could not stop still runs:
        then the lease ends on its own (``release-last``). The release is
        bounded (``release_or_expire``): one still hanging is left behind, and
        the lease expires.
        """
        if outcome.unstoppable:
            held.renewer.stop(0.0)
            log.error(
                "not releasing %s: the lease expires on its own", self.settings.lock
            )
            return
        status = None if outcome.returncode is None else exit_status(outcome.returncode)
        run_outcome = classify(
            outcome.returncode,
            timed_out=outcome.timed_out,
            lease_lost=outcome.stopped_because is not None,
        )
        if outcome.failure is not None:
            run_outcome = RunOutcome.killed
        timing = self.settings.timing
        session = held.renewer.stop(timing.attempt_budget_s)
        end = self._end(run_outcome, status, output=output)
        release_or_expire(self.store, session, held.lease, timing, end)

    def _exit_status(self, outcome: Outcome) -> int:
        """The exit status for how the run ended; says why on stderr."""
        s = self.settings
        if outcome.failure is not None or outcome.unstoppable:
            return EXIT_INTERNAL
        if outcome.timed_out:
            log.error(
                "the command ran longer than --max-runtime %gs and was stopped",
                s.max_runtime_s,
                extra={"event": "timeout"},
            )
            return EXIT_TIMEOUT
        if outcome.stopped_because is not None:
            log.error(
                "lease on %s lost: %s; the command was stopped",
                s.lock,
                outcome.stopped_because,
                extra={"event": "lost"},
            )
            return EXIT_LEASE_LOST
        if outcome.returncode is None:  # run() returns only once it exited
            raise InvariantError("the supervisor returned before the command exited")
        log.info(
            "the command exited with status %d",
            exit_status(outcome.returncode),
            extra={"event": "child_exit", "status": exit_status(outcome.returncode)},
        )
        return exit_status(outcome.returncode)

    def _disarm(self, watchdog: Watchdog | None) -> None:
        """The group is gone: tell the watchdog, which then exits."""
        if watchdog is not None:
            watchdog.disarm()
            watchdog.close()

    def _end(
        self,
        outcome: RunOutcome,
        status: int | None,
        *,
        hold: bool = True,
        output: str | None = None,
    ) -> RunEnd:
        """How this run ended, for the release that closes it.

        ``--min-hold`` applies only to a command that started (``hold``): a
        lease taken but never used is freed at once. ``output`` is the
        captured tail.
        """
        s = self.settings
        return RunEnd(
            outcome,
            status,
            min_hold_s=s.min_hold_s if hold else 0.0,
            in_window=s.once_per is not None,
            output=output,
        )

    @property
    def _unstarted(self) -> RunEnd:
        """The end of a grant whose command never started; no run is recorded.

        A signal came first, or the grant came too late to use.
        """
        return replace(self._end(RunOutcome.killed, None, hold=False), started=False)

    def _cancel_on(
        self, signals: list[int], contender: _Contender, lease: Lease | None = None
    ) -> None:
        """Cancel cleanly if a cancelling signal arrived: give back, close, raise.

        A granted ``lease`` is released as a run that never started, bounded
        like the release at exit so that a cancel cannot hang on it; its session
        goes with it, closed by the thread that may still be using it.
        """
        cancelling = [n for n in signals if n in CANCELLING_SIGNALS]
        if not cancelling:
            return
        if lease is not None:
            session = contender.hand_over()
            release_or_expire(
                self.store, session, lease, self.settings.timing, self._unstarted
            )
        raise CancelledBySignalError(cancelling[0], CANCELLED)

    def _busy_message(self, result: AcquireResult) -> str:
        s = self.settings
        who = "another node"
        if result.holder_host is not None:
            who = f"{result.holder_host} (pid {result.holder_pid})"
        left = ""
        if result.expires_in_s is not None:
            left = (
                f", lease ends in {max(0.0, result.expires_in_s):.1f}s unless renewed"
            )
        waited = " after waiting" if s.wait else ""
        return f"{s.lock} is held by {who}{left}; not running the command{waited}"

    def _window_message(self, result: AcquireResult) -> str:
        once_per = self.settings.once_per
        slot = "the current slot"
        if once_per is not None and result.window_start is not None:
            slot = once_per.local(result.window_start.timestamp()).isoformat()
        what = "" if once_per is None else f" ({once_per.flags()})"
        where = "" if result.holder_host is None else f" on {result.holder_host}"
        return (
            f"{self.settings.lock} already ran{where} in the slot of {slot}{what}; "
            "not running the command"
        )


def run_command(
    settings: RunSettings,
    store: LeaseStore,
    env: Mapping[str, str],
    host: str,
    *,
    listen_store: LeaseStore | None = None,
) -> int:
    """Run ``settings.command`` under the lease; return leaderrun's exit status."""
    try:
        return Run(settings, store, env, host=host, listen_store=listen_store)()
    except BusyError as exc:
        exc.exit_code = settings.busy_exit_code
        raise
