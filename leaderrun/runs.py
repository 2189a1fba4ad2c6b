"""Run history, the pure part: how a run ended, and what a record of it holds.

Nothing here reads a clock or does I/O. Which slot a ``--once-per`` or
``--schedule`` run belongs to is :mod:`leaderrun.slots`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

DEFAULT_HISTORY_KEEP = 100
"""Rows of ``leader_run`` kept per lock when ``--history-keep`` is not given."""


class RunOutcome(StrEnum):
    """How a run ended, as recorded in ``leader_run.outcome``."""

    ok = "ok"
    """The command exited with status 0."""
    failed = "failed"
    """The command exited with a non-zero status (or could not be started)."""
    killed = "killed"
    """The command died of a signal that did not come from a leaderrun deadline."""
    timeout = "timeout"
    """``--max-runtime`` passed and leaderrun stopped the command (exit 124)."""
    lost = "lost"
    """The lease was lost while the command ran, or its holder died."""


RUNNING = "running"
"""What ``history`` shows for a run whose lease is still live."""


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, given to the release statement that closes it.

    Args:
        outcome: the classification (see :func:`classify`).
        exit_status: leaderrun's view of the command's status (the code, or
            128+N for signal N); None when the command never produced one.
        min_hold_s: keep the lease taken until ``acquired_at + min_hold_s`` in
            database time (``--min-hold``); 0 frees it at once.
        in_window: the run was a ``--once-per``/``--schedule`` slot's run, so
            whether it ended well decides ``--retry-failed``.
        output: the last ``--capture-output`` bytes of the child's stdout and
            stderr, decoded with ``errors='replace'``; None when not captured.
    """

    outcome: RunOutcome
    exit_status: int | None
    min_hold_s: float = 0.0
    in_window: bool = False
    started: bool = True
    """False: the command never started (a grant too late to use, a cancel), so
    the run leaves no history, counts in no counter and spends no slot."""
    output: str | None = None
    """The last ``--capture-output`` bytes of the child's stdout and stderr,
    decoded with errors='replace'; None when not captured."""

    @property
    def window_ok(self) -> bool | None:
        """For ``--retry-failed``: whether the slot's run ended ok; None if none."""
        return self.outcome is RunOutcome.ok if self.in_window else None


@dataclass(frozen=True)
class RunRecord:
    """One row of ``leader_run``, as ``history`` and ``status`` show it.

    Times are the database's, timezone-aware. ``outcome`` is one of
    :class:`RunOutcome`'s values, or ``running`` while the lease is live; a run
    with no outcome whose lease has ended is shown as ``lost`` even before the
    next holder closes it.
    """

    lock_key: int
    lock_name: str | None
    token: int
    holder: str
    host: str | None
    pid: int | None
    command: str | None
    window_start: datetime | None
    started_at: datetime
    finished_at: datetime | None
    exit_status: int | None
    outcome: str
    duration_s: float
    """From start to finish, or to the database's now() while running."""

    @property
    def lock(self) -> str:
        """The lock's name, or its key when it has none."""
        return self.lock_name if self.lock_name is not None else str(self.lock_key)


def classify(
    returncode: int | None, *, timed_out: bool = False, lease_lost: bool = False
) -> RunOutcome:
    """The outcome of a run from how the supervisor saw it end.

    Args:
        returncode: the command's status as ``subprocess`` reports it (negative
            for death by a signal), or None if it never exited on its own.
        timed_out: leaderrun stopped it because ``--max-runtime`` passed.
        lease_lost: leaderrun stopped it because the lease was lost.

    A deadline that leaderrun enforced wins over the status it caused: a child
    stopped at ``--max-runtime`` dies of SIGTERM, but its outcome is ``timeout``.
    """
    if lease_lost:
        return RunOutcome.lost
    if timed_out:
        return RunOutcome.timeout
    if returncode is None or returncode < 0:
        return RunOutcome.killed
    return RunOutcome.ok if returncode == 0 else RunOutcome.failed
