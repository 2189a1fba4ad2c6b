"""``leaderrun check``, the pure part: did the job run anywhere, and did it succeed?

A dead-man's switch read from the shared history, with ``now`` (the database's)
passed in. What is expected comes from the lock's recorded cadence (its last
``--schedule`` or ``--once-per`` run, see :mod:`leaderrun.slots`) plus a grace,
or is given (``--max-age``). The verdict follows the monitoring-plugin
conventions that Nagios, Icinga, Sensu and Zabbix's agents read: exit 0 OK, 1
WARNING, 2 CRITICAL, 3 UNKNOWN, and one status line with performance data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from leaderrun.runs import RUNNING, RunOutcome, RunRecord
from leaderrun.slots import DEFAULT_EARLY_S, OncePer, Schedule, ScheduleError, Window
from leaderrun.views import LockStatus, human_duration, iso_utc

DEFAULT_GRACE_S = 300.0
"""How long after its slot a run may take to start before the slot is missed."""


class CheckState(IntEnum):
    """A monitoring plugin's states; the value is the exit status."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Expectation:
    """What ``check`` expects of a lock.

    Args:
        max_age_s: the last success may be this old (WARNING past it,
            CRITICAL past it plus ``grace_s``); None: from the cadence.
        grace_s: with a cadence, how long after its slot a run may take to
            start; with ``max_age_s``, the time from WARNING to CRITICAL.
        max_running_s: a run going on longer than this is a WARNING; None:
            with a cadence, until the next slot; without, no limit.
    """

    max_age_s: float | None = None
    grace_s: float = DEFAULT_GRACE_S
    max_running_s: float | None = None


@dataclass(frozen=True)
class CheckResult:
    """The verdict: a state, one line of text, and the figures behind it."""

    lock: str
    state: CheckState
    message: str
    db_now: datetime
    age_s: float | None = None
    """Seconds since the last success ended; None if it never succeeded."""
    warn_s: float | None = None
    crit_s: float | None = None
    due_slot: datetime | None = None
    """With a cadence: the latest slot that should have run by now."""
    last_run: RunRecord | None = None

    def line(self) -> str:
        """The plugin's status line: ``LEADERRUN OK - lock: text | age=...``."""
        perf = []
        if self.age_s is not None:
            limits = ";".join("" if v is None else f"{v:g}" for v in self._limits)
            perf.append(f"age={self.age_s:.0f}s;{limits}")
        if self.last_run is not None:
            perf.append(f"duration={self.last_run.duration_s:.1f}s")
        tail = f" | {' '.join(perf)}" if perf else ""
        return f"LEADERRUN {self.state.name} - {self.lock}: {self.message}{tail}"

    @property
    def _limits(self) -> tuple[float | None, float | None]:
        return self.warn_s, self.crit_s

    def document(self) -> dict[str, Any]:
        """``check --json``: the verdict and its figures, times in ISO 8601 UTC."""
        run = self.last_run
        return {
            "lock": self.lock,
            "state": self.state.name,
            "exit_code": int(self.state),
            "message": self.message,
            "database_time": iso_utc(self.db_now),
            "age_s": self.age_s,
            "warn_s": self.warn_s,
            "crit_s": self.crit_s,
            "due_slot": iso_utc(self.due_slot),
            "last_run": None
            if run is None
            else {
                "token": run.token,
                "host": run.host,
                "outcome": run.outcome,
                "exit_status": run.exit_status,
                "slot": iso_utc(run.window_start),
                "started_at": iso_utc(run.started_at),
                "finished_at": iso_utc(run.finished_at),
                "duration_s": run.duration_s,
            },
        }


def cadence_of(recorded: dict[str, Any] | None) -> OncePer | None:
    """The cadence a lock recorded (``status --json``'s ``cadence``), or None.

    Raises:
        ScheduleError: the record is not one leaderrun wrote.
    """
    if recorded is None:
        return None
    try:
        if "schedule" in recorded:
            cadence: Window | Schedule = Schedule(str(recorded["schedule"]))
        else:
            cadence = Window(
                float(recorded["once_per_s"]), float(recorded.get("offset_s", 0.0))
            )
        return OncePer(
            cadence,
            retry_failed=bool(recorded.get("retry_failed", False)),
            tz=str(recorded.get("tz", "UTC")),
            early_s=float(recorded.get("early_s", DEFAULT_EARLY_S)),
        )
    except ScheduleError:
        raise
    except (KeyError, TypeError, ValueError):
        raise ScheduleError(f"unreadable cadence {recorded!r}") from None


_FAILED = {o.value for o in RunOutcome} - {RunOutcome.ok.value}


def check(
    status: LockStatus,
    runs: Sequence[RunRecord],
    db_now: datetime,
    expect: Expectation,
) -> CheckResult:
    """The verdict on one lock, from its status and its newest runs (newest first)."""
    now_s = db_now.timestamp()
    last = runs[0] if runs else None
    last_ok_s = None if status.last_ok_at is None else status.last_ok_at.timestamp()
    age_s = None if last_ok_s is None else now_s - last_ok_s
    base: dict[str, Any] = {
        "lock": status.lock,
        "db_now": db_now,
        "age_s": age_s,
        "last_run": last,
    }

    def verdict(state: CheckState, message: str, **more: Any) -> CheckResult:
        return CheckResult(state=state, message=message, **base, **more)

    once_per = None
    if expect.max_age_s is None:
        try:
            once_per = cadence_of(status.cadence)
        except ScheduleError as exc:
            return verdict(CheckState.UNKNOWN, f"{exc}; give --max-age")
        if once_per is None:
            return verdict(
                CheckState.UNKNOWN,
                "no --schedule or --once-per run recorded to expect a cadence "
                "from; give --max-age",
            )
    if last is None and last_ok_s is None:
        return verdict(CheckState.CRITICAL, "never ran")

    if last is not None and last.outcome == RUNNING:
        limit_s = expect.max_running_s
        if limit_s is None and once_per is not None and last.window_start is not None:
            limit_s = once_per.late_limit_s(last.window_start.timestamp(), count=1)
        if limit_s is not None and last.duration_s > limit_s:
            return verdict(
                CheckState.WARNING,
                f"running on {last.host} for {human_duration(last.duration_s)}, "
                f"longer than the {human_duration(limit_s)} expected",
            )

    if once_per is None:
        return _by_age(expect, verdict, last, age_s)
    return _by_slot(once_per, expect, verdict, runs, now_s)


Verdict = Callable[..., CheckResult]
"""Makes a :class:`CheckResult` from a state, a message and more figures."""


def _failure(run: RunRecord) -> str:
    """How a run that did not succeed ended, in words."""
    status = "" if run.exit_status is None else f" (exit {run.exit_status})"
    return f"the last run {run.outcome}{status} on {run.host}"


def _by_age(
    expect: Expectation, verdict: Verdict, last: RunRecord | None, age_s: float | None
) -> CheckResult:
    """``--max-age``: the last success is recent enough, and the last run not failed."""
    warn_s = expect.max_age_s or 0.0
    crit_s = warn_s + expect.grace_s
    limits = {"warn_s": warn_s, "crit_s": crit_s}
    if last is not None and last.outcome in _FAILED:
        return verdict(CheckState.CRITICAL, _failure(last), **limits)
    if age_s is None:
        return verdict(CheckState.CRITICAL, "never succeeded", **limits)
    ago = f"the last success was {human_duration(age_s)} ago"
    if age_s > crit_s:
        return verdict(
            CheckState.CRITICAL, f"{ago}, over --max-age and --grace", **limits
        )
    if age_s > warn_s:
        return verdict(CheckState.WARNING, f"{ago}, over --max-age", **limits)
    return verdict(CheckState.OK, ago, **limits)


def _by_slot(
    once_per: OncePer,
    expect: Expectation,
    verdict: Verdict,
    runs: Sequence[RunRecord],
    now_s: float,
) -> CheckResult:
    """A cadence: the latest slot due by now (less the grace) ran, and ran well."""
    due_s = once_per.slot_at(now_s - expect.grace_s).start_s
    due = once_per.local(due_s)
    slot = due.isoformat()
    in_slot = [
        run
        for run in runs
        if run.window_start is not None and run.window_start.timestamp() >= due_s
    ]
    more = {"due_slot": due}
    for outcome, done in ((RunOutcome.ok.value, "ran ok"), (RUNNING, "is running")):
        run = next((r for r in in_slot if r.outcome == outcome), None)
        if run is not None and run.window_start is not None:
            ran = once_per.local(run.window_start.timestamp()).isoformat()
            return verdict(CheckState.OK, f"the slot of {ran} {done}", **more)
    if in_slot:
        return verdict(
            CheckState.CRITICAL, f"slot {slot}: {_failure(in_slot[0])}", **more
        )
    return verdict(CheckState.CRITICAL, f"slot {slot} missed: no run started", **more)
