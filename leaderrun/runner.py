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
import os
import random
import secrets
import shlex
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from leaderrun.clock import boottime
from leaderrun.config import RunSettings, WatchdogMode
from leaderrun.errors import (
    EXIT_INTERNAL,
    EXIT_LEASE_LOST,
    EXIT_TIMEOUT,
    BusyError,
    CancelledError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
    SystemResourceError,
)
from leaderrun.handoff import Handoff
from leaderrun.heartbeat import LeaseState, Renewer
from leaderrun.lease import Lease, kill_deadline, make_holder, retry_delay_s
from leaderrun.runs import RunEnd, RunOutcome, classify, iso_utc
from leaderrun.stores.base import AcquireResult, Claim, LeaseSession, LeaseStore
from leaderrun.supervisor import (
    CANCELLING_SIGNALS,
    Child,
    Outcome,
    SignalInbox,
    Supervisor,
    become_subreaper,
    exit_status,
    job_control_ignored,
    pidfd_supported,
    privilege_warning,
    resolve_command,
)
from leaderrun.watchdog import WATCHDOG_LATE_S, Watchdog

log = logging.getLogger("leaderrun")

RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
"""Pauses between reconnects of a waiting contender whose database went away."""


@dataclass
class Acquired:
    """A lease just taken, the instant its statement was sent, and its session."""

    lease: Lease
    t_sent_s: float
    session: LeaseSession
    window_start: datetime | None = None
    """With ``--once-per``: the start of the window this run belongs to."""


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
    window = iso_utc(window_start)
    if window is not None:
        child["LEADERRUN_WINDOW"] = window
    return child


class Run:
    """One invocation of ``leaderrun run``.

    Args:
        settings: the validated options.
        store: where the lease lives.
        env: leaderrun's own environment (the child's is derived from it).
        host: this machine's name, recorded in the lease row.
        clock: CLOCK_BOOTTIME, or a fake.
        unit_random: numbers in [0, 1), for jitter.
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
    ) -> None:
        self.settings = settings
        self.store = store
        self.env = env
        self.clock = clock
        self.unit_random = unit_random
        pid = os.getpid()
        self.claim = Claim(
            holder=make_holder(host, pid, secrets.token_hex(8)),
            host=host,
            pid=pid,
            command=shlex.join(settings.command),
        )

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
        with SignalInbox() as inbox:
            watchdog = self._start_watchdog()
            try:
                acquired = self.acquire(inbox)
                return self.supervise(acquired, inbox, watchdog, pidfds=pidfds)
            finally:
                if watchdog is not None:
                    watchdog.close()

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

    def acquire(self, inbox: SignalInbox) -> Acquired:
        """Take the lease, waiting for it if asked; cancellable by a signal.

        Raises:
            BusyError: held elsewhere (and the wait, if any, timed out).
            CancelledError: a signal arrived first.
            DatabaseUnavailableError: the database could not be used.
        """
        handoff = Handoff(self.store, self.settings.lock, enabled=self.settings.wait)
        try:
            return self._acquire(inbox, handoff)
        finally:
            handoff.close()  # before the child starts: it needs no LISTEN

    def _acquire(self, inbox: SignalInbox, handoff: Handoff) -> Acquired:
        s = self.settings
        started_s = self.clock()
        if not s.wait:
            give_up_s = started_s
        elif s.wait_timeout_s is None:
            give_up_s = math.inf
        else:
            give_up_s = started_s + s.wait_timeout_s
        failures = 0
        try:
            with inbox.cancelling():
                session = self.store.connect()
        except DatabaseUnavailableError as exc:
            # Unreachable at the start: exit 69 at once, unless told to wait. A
            # waiter started mid-failover (every host down or a standby) retries.
            if not s.wait or self.clock() >= give_up_s:
                raise
            session = self._reconnect(inbox, exc, failures, give_up_s)
            failures += 1
        while True:
            self._cancel_on(inbox.take(), session, None)
            log.debug("acquiring %s", s.lock)
            t_sent_s = self.clock()
            try:
                # A signal while the statement waits (a row lock, a frozen
                # server) cancels it and ends the run with nothing started.
                with inbox.cancelling():
                    result = session.acquire(
                        s.lock,
                        self.claim,
                        s.timing.lease_s,
                        once_per=s.once_per,
                        history_keep=s.history_keep,
                    )
            except SchemaMissingError:
                session.close()
                raise
            except DatabaseUnavailableError as exc:
                session.close()
                if not s.wait or self.clock() >= give_up_s:
                    raise
                session = self._reconnect(inbox, exc, failures, give_up_s)
                failures += 1
                continue
            except BaseException:
                session.close()
                raise
            failures = 0
            if result.lease is not None:
                self._cancel_on(inbox.take(), session, result.lease, self._unstarted)
                elapsed_s = self.clock() - t_sent_s
                if elapsed_s < s.timing.kill_deadline_s:
                    log.info(
                        "acquired %s (fencing token %d)",
                        s.lock,
                        result.lease.token,
                        extra={"event": "acquired", "token": result.lease.token},
                    )
                    return Acquired(
                        result.lease, t_sent_s, session, result.window_start
                    )
                # local-deadline: the reply came so late that the child could not be
                # stopped in time; do not start it.
                log.warning(
                    "the acquire took %.3gs, past the kill deadline; not starting",
                    elapsed_s,
                )
                # The lease was unusable: the run is closed as lost.
                unused = self._end(RunOutcome.lost, None, started=False)
                self._release(session, result.lease, unused)
                if not s.wait:
                    session.close()
                    raise DatabaseUnavailableError(
                        f"the database took {elapsed_s:.3g}s to grant the lease, longer"
                        " than the kill deadline allows; use a longer --lease-duration"
                    )
                continue
            if result.window_done:
                # Waiting cannot help: the window stays done until it ends.
                session.close()
                raise BusyError(self._window_message(result))
            now_s = self.clock()
            if now_s >= give_up_s:
                session.close()
                raise BusyError(self._busy_message(result))
            with inbox.cancelling():
                listening = handoff.listen()
            if listening:
                continue  # a release just before the LISTEN went unheard: look again
            delay_s = retry_delay_s(result.expires_in_s, s.timing, self.unit_random())
            log.debug("%s is held; retrying in %.3gs", s.lock, delay_s)
            if handoff.wait(inbox.fileno(), min(delay_s, give_up_s - now_s)):
                log.debug("%s was released; trying now", s.lock)
            self._cancel_on(inbox.take(), session, None)

    def supervise(
        self,
        acquired: Acquired,
        inbox: SignalInbox,
        watchdog: Watchdog | None = None,
        *,
        pidfds: bool = True,
    ) -> int:
        """Start the child, renew while it runs, stop it if the lease goes; release.

        From the moment the child exists, any failure of leaderrun's own stops
        its whole group and releases the lease (exit 125): a child is never left
        running unsupervised with the lease held.
        """
        s = self.settings
        lease = acquired.lease
        state = LeaseState(kill_deadline(acquired.t_sent_s, s.timing))
        # After the watchdog was forked, so that it is not one of our children.
        become_subreaper()
        env = child_environment(self.env, lease, s, acquired.window_start)
        helpers = () if watchdog is None or watchdog.pid is None else (watchdog.pid,)
        try:
            child = Child(s.command, env, helpers)
        except LeaderrunError as exc:
            end = self._end(RunOutcome.failed, exc.exit_code, started=False)
            self._release(acquired.session, lease, end)
            acquired.session.close()
            raise
        runtime_deadline_s = (
            None if s.max_runtime_s is None else self.clock() + s.max_runtime_s
        )
        supervisor = Supervisor(
            child,
            inbox,
            state,
            s.timing.kill_grace_s,
            self.clock,
            runtime_deadline_s=runtime_deadline_s,
            watchdog=watchdog,
            watchdog_required=s.watchdog is WatchdogMode.required,
        )
        # Only now may another thread start: the child was forked from the main
        # thread, so its parent-death signal is tied to this thread's life.
        renewer = Renewer(
            self.store,
            acquired.session,
            lease,
            s.timing,
            state,
            t_sent_s=acquired.t_sent_s,
            clock=self.clock,
            unit_random=self.unit_random,
        )
        with job_control_ignored():
            try:
                if watchdog is not None:
                    deadline_s, _ = state.snapshot()
                    watchdog.arm(child.pgid, deadline_s + WATCHDOG_LATE_S)
                if pidfds:
                    child.watch()
                renewer.start()
                outcome = supervisor.run()
            except Exception as exc:
                # Stop first (a signal), then say why: nothing may wait before it.
                supervisor.stop(f"leaderrun failed after the command started: {exc}")
                log.exception("leaderrun failed after the command started")
                outcome = Outcome(
                    child.returncode,
                    failure=str(exc),
                    unstoppable=supervisor.unstoppable,
                )
        self._disarm(watchdog)
        status = None if outcome.returncode is None else exit_status(outcome.returncode)
        run_outcome = classify(
            outcome.returncode,
            timed_out=outcome.timed_out,
            lease_lost=outcome.stopped_because is not None,
        )
        if outcome.failure is not None:
            run_outcome = RunOutcome.killed
        if outcome.unstoppable:
            # Never released while one of them runs: the lease ends on its own.
            renewer.stop(0.0)
            log.error("not releasing %s: the lease expires on its own", s.lock)
        else:
            self._finish(renewer, lease, self._end(run_outcome, status))
        child.close()
        if not renewer.alive():
            state.close()  # else a stuck renewal may still write to it
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
            raise LeaderrunError("the supervisor returned before the command exited")
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
        self, outcome: RunOutcome, status: int | None, *, started: bool = True
    ) -> RunEnd:
        """How this run ended, for the release that closes it.

        ``--min-hold`` applies only to a command that started: a lease taken
        but never used is freed at once.
        """
        s = self.settings
        return RunEnd(
            outcome,
            status,
            min_hold_s=s.min_hold_s if started else 0.0,
            in_window=s.once_per is not None,
        )

    @property
    def _unstarted(self) -> RunEnd:
        """The end of a run cancelled by a signal before its command started."""
        return self._end(RunOutcome.killed, None, started=False)

    def _finish(self, renewer: Renewer, lease: Lease, end: RunEnd) -> None:
        """Stop renewing and release; the child's group is already gone.

        Bounded: a release can hang where a renewal would have been abandoned
        (a commit waiting for a synchronous standby that is gone). Then it is
        left behind, and the lease expires on its own.
        """
        session = renewer.stop(self.settings.timing.attempt_budget_s)
        self._bounded(lambda: self._connect_and_release(session, lease, end))

    def _bounded(self, release: Callable[[], None]) -> None:
        """Run ``release`` in a daemon thread; wait two attempt budgets at most.

        A fresh connection may take one budget, the statement another. A release
        still hanging after that is left behind: the lease expires on its own.
        """
        limit_s = 2 * self.settings.timing.attempt_budget_s
        done = threading.Event()

        def work() -> None:
            try:
                release()
            finally:
                done.set()

        threading.Thread(target=work, name="leaderrun-release", daemon=True).start()
        if not done.wait(limit_s):
            log.warning(
                "the release took longer than %.3gs; leaving it (the lease will "
                "expire)",
                limit_s,
            )

    def _connect_and_release(
        self, session: LeaseSession | None, lease: Lease, end: RunEnd
    ) -> None:
        if session is None:
            try:
                session = self.store.connect()
            except DatabaseUnavailableError as exc:
                log.warning(
                    "could not release (the lease will expire): %s", exc.message
                )
                return
        self._release(session, lease, end)
        session.close()

    def _release(
        self, session: LeaseSession, lease: Lease, end: RunEnd | None = None
    ) -> None:
        try:
            if session.release(lease, end):
                log.info("released %s", lease.lock, extra={"event": "released"})
            else:
                log.info("%s was no longer ours to release", lease.lock)
        except DatabaseUnavailableError as exc:
            log.warning("could not release (the lease will expire): %s", exc.message)

    def _cancel_on(
        self,
        signals: list[int],
        session: LeaseSession,
        lease: Lease | None,
        end: RunEnd | None = None,
    ) -> None:
        """Cancel cleanly if a cancelling signal arrived: release, close, raise."""
        cancelling = [n for n in signals if n in CANCELLING_SIGNALS]
        if not cancelling:
            return
        if lease is None:
            session.close()
        else:
            # Bounded like the release at exit, so a cancel cannot hang on it;
            # the session is closed by the thread that may still be using it.
            def release_and_close() -> None:
                self._release(session, lease, end)
                session.close()

            self._bounded(release_and_close)
        raise CancelledError(
            cancelling[0],
            "cancelled by a signal while waiting for the lock; nothing ran",
        )

    def _reconnect(
        self,
        inbox: SignalInbox,
        error: DatabaseUnavailableError,
        failures: int,
        give_up_s: float,
    ) -> LeaseSession:
        """Reconnect a waiting contender, backing off, until the wait runs out."""
        while True:
            pause_s = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
            log.warning("%s; retrying in %gs", error.message, pause_s)
            signals = inbox.wait(min(pause_s, max(0.0, give_up_s - self.clock())))
            cancelling = [n for n in signals if n in CANCELLING_SIGNALS]
            if cancelling:
                raise CancelledError(
                    cancelling[0], "cancelled by a signal while waiting for the lock"
                )
            try:
                with inbox.cancelling():
                    return self.store.connect()
            except DatabaseUnavailableError as exc:
                if self.clock() >= give_up_s:
                    raise
                error, failures = exc, failures + 1

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
        window = iso_utc(result.window_start) or "the current window"
        where = "" if result.holder_host is None else f" on {result.holder_host}"
        return (
            f"{self.settings.lock} already ran{where} in the --once-per window "
            f"starting {window}; not running the command"
        )


def run_command(
    settings: RunSettings, store: LeaseStore, env: Mapping[str, str], host: str
) -> int:
    """Run ``settings.command`` under the lease; return leaderrun's exit status."""
    try:
        return Run(settings, store, env, host=host)()
    except BusyError as exc:
        exc.exit_code = settings.busy_exit_code
        raise
