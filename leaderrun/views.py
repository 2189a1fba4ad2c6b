"""What the operators' commands show, pure: ``status``, ``history``, ``release``.

One place for how leaderrun presents times, durations and tables, so that every
command agrees: instants are ISO 8601 in UTC with milliseconds
(:func:`iso_utc`), durations are short and rounded (:func:`human_duration`),
and piped tables are aligned by :func:`plain_table`.

Rows come in as :class:`leaderrun.stores.base.LeaseRecord` and
:class:`leaderrun.runs.RunRecord` with the database's own ``now()``; every
duration is computed against that, never against this host's clock. Nothing
here does I/O or imports typer or rich: the command line prints what these
functions return (a rich table on a terminal, plain text when piped, JSON).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from leaderrun.errors import EXIT_BUSY, EXIT_STATUS_FREE
from leaderrun.lease import LockId
from leaderrun.runs import RunOutcome, RunRecord
from leaderrun.stores.base import (
    REVOKED_HOLDER,
    LeaseRecord,
    LeaseSnapshot,
    ReleaseAction,
    ReleaseResult,
)

STATUS_JSON_VERSION = 1
"""The version of ``status --json``'s shape; it changes only if a field does."""

COLUMNS = (
    "LOCK",
    "KEY",
    "STATE",
    "HOLDER",
    "TOKEN",
    "ACQUIRED (UTC)",
    "EXPIRES",
    "RENEWED",
    "LAST RUN (UTC)",
    "RAN ON",
    "OUTCOME",
    "TOOK",
    "COMMAND",
)
"""The columns of the ``status`` table, in order."""


class LockState(StrEnum):
    """A lock's state as the database's clock sees it."""

    held = "held"
    """A live lease: its holder runs the command."""
    revoked = "revoked"
    """Ended by ``release --force``; nobody may take it until it runs out."""
    expired = "expired"
    """The lease ran out without a release; the next contender takes it."""
    free = "free"
    """Released, or never taken."""


@dataclass(frozen=True)
class LockStatus:
    """One line of ``status``: a lock and its lease, durations in database time.

    For a lock that is not held, ``host``, ``pid``, ``token`` and the times are
    those of its last holder (None if it was never taken).
    """

    lock: str
    name: str | None
    key: int
    state: LockState
    holder: str | None
    host: str | None
    pid: int | None
    token: int | None
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None
    expires_in_s: float | None
    """Seconds until the lease runs out; negative once it has."""
    renewed_ago_s: float | None
    command: str | None
    last_run: RunRecord | None = None
    """The newest run in the history (``leader_run``), if any was recorded."""
    last_ok_at: datetime | None = None
    """When the lock's last successful run ended (kept through pruning)."""
    counts: Mapping[str, int] = field(default_factory=dict)
    """Runs of the lock ever, by outcome (``ok``, ``failed``, ...)."""
    cadence: dict[str, Any] | None = None
    """The ``--once-per``/``--schedule`` cadence of the lock's last slotted run:
    ``schedule`` (five cron fields) or ``once_per_s`` and ``offset_s``, with
    ``tz``, ``early_s`` and ``retry_failed``; None if it never had one."""

    @property
    def taken(self) -> bool:
        """Whether no contender can take the lock now (held, or revoked and live)."""
        return self.state in (LockState.held, LockState.revoked)


def lock_status(record: LeaseRecord, db_now: datetime) -> LockStatus:
    """The status of one row, at the database's ``db_now``."""
    expires_in_s = (record.expires_at - db_now).total_seconds()
    if record.holder is None:
        state = LockState.free
    elif expires_in_s <= 0:
        state = LockState.expired
    elif record.holder == REVOKED_HOLDER:
        state = LockState.revoked
    else:
        state = LockState.held
    return LockStatus(
        lock=record.name if record.name is not None else str(record.key),
        name=record.name,
        key=record.key,
        state=state,
        holder=None if record.holder == REVOKED_HOLDER else record.holder,
        host=record.host,
        pid=record.pid,
        token=record.token,
        acquired_at=record.acquired_at,
        renewed_at=record.renewed_at,
        expires_at=record.expires_at,
        expires_in_s=expires_in_s,
        renewed_ago_s=(db_now - record.renewed_at).total_seconds(),
        command=record.command,
        cadence=_cadence(record.cadence),
        last_ok_at=record.last_ok_at,
        counts={o.value: getattr(record, f"runs_{o.value}") for o in RunOutcome},
    )


def _cadence(text: str | None) -> dict[str, Any] | None:
    """The recorded cadence (JSON that leaderrun wrote); None if none or unreadable."""
    if text is None:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None  # edited by hand: status still shows the rest
    return document if isinstance(document, dict) else None


def never_taken(lock: LockId) -> LockStatus:
    """The status of a lock that has no row: free, with no last holder."""
    return LockStatus(
        lock=str(lock),
        name=lock.name,
        key=lock.key,
        state=LockState.free,
        holder=None,
        host=None,
        pid=None,
        token=None,
        acquired_at=None,
        renewed_at=None,
        expires_at=None,
        expires_in_s=None,
        renewed_ago_s=None,
        command=None,
    )


def statuses(
    snapshot: LeaseSnapshot,
    lock: LockId | None,
    last_runs: Sequence[RunRecord] = (),
) -> list[LockStatus]:
    """One status per lock; a named lock without a row is shown as free.

    ``last_runs`` (the newest run of each lock) are attached by lock key.
    """
    found = [lock_status(r, snapshot.db_now) for r in snapshot.records]
    if lock is not None and not found:
        found = [never_taken(lock)]
    runs = {run.lock_key: run for run in last_runs}
    return [replace(s, last_run=runs.get(s.key)) for s in found]


def status_exit_code(found: Sequence[LockStatus], lock: LockId | None) -> int:
    """0 when the named lock is taken (or no lock was named), 3 when it is free."""
    if lock is None:
        return 0
    return 0 if any(s.taken for s in found) else EXIT_STATUS_FREE


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a ``Z``: ``2026-11-27T02:40:01.250Z``.

    The one format of every instant leaderrun prints or hands to a child.
    """
    if moment is None:
        return None
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def status_document(found: Sequence[LockStatus], db_now: datetime) -> dict[str, Any]:
    """The ``status --json`` document; its shape is documented and stable.

    ``{"version": 1, "database_time": ISO, "locks": [{...}]}``, each lock with
    ``lock``, ``name``, ``key``, ``state``, ``holder``, ``host``, ``pid``,
    ``token``, ``acquired_at``, ``renewed_at``, ``expires_at`` (ISO 8601 UTC or
    null), ``expires_in_s``, ``renewed_ago_s`` (seconds, database time),
    ``command``, ``last_run`` and ``cadence`` (see :attr:`LockStatus.cadence`).
    """
    return {
        "version": STATUS_JSON_VERSION,
        "database_time": iso_utc(db_now),
        "locks": [
            {
                "lock": s.lock,
                "name": s.name,
                # A string: a 64-bit key loses precision as a JavaScript number.
                "key": str(s.key),
                "state": s.state.value,
                "holder": s.holder,
                "host": s.host,
                "pid": s.pid,
                "token": s.token,
                "acquired_at": iso_utc(s.acquired_at),
                "renewed_at": iso_utc(s.renewed_at),
                "expires_at": iso_utc(s.expires_at),
                "expires_in_s": _seconds(s.expires_in_s),
                "renewed_ago_s": _seconds(s.renewed_ago_s),
                "command": s.command,
                "last_run": _last_run_document(s.last_run),
                "cadence": s.cadence,
            }
            for s in found
        ],
    }


def _last_run_document(run: RunRecord | None) -> dict[str, Any] | None:
    """``last_run`` of ``status --json``: when, where, how it ended, how long."""
    if run is None:
        return None
    return {
        "token": run.token,
        "host": run.host,
        "pid": run.pid,
        "started_at": iso_utc(run.started_at),
        "finished_at": iso_utc(run.finished_at),
        "duration_s": _seconds(run.duration_s),
        "exit_status": run.exit_status,
        "outcome": run.outcome,
    }


def human_duration(seconds: float) -> str:
    """Short and rounded: ``0.4s``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d4h``."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600}h"


def status_cells(s: LockStatus) -> tuple[str, ...]:
    """The text of one status row, one cell per column of :data:`COLUMNS`."""
    dash = "-"
    holder = dash
    if s.state is not LockState.free and s.host is not None:
        holder = f"{s.host} pid {s.pid}"
    expires = dash
    if s.expires_in_s is not None and s.state is not LockState.free:
        expires = (
            f"in {human_duration(s.expires_in_s)}"
            if s.expires_in_s > 0
            else f"{human_duration(s.expires_in_s)} ago"
        )
    renewed = dash
    if s.renewed_ago_s is not None and s.state is not LockState.free:
        renewed = f"{human_duration(s.renewed_ago_s)} ago"
    acquired = dash if s.acquired_at is None else table_time(s.acquired_at)
    run = s.last_run
    last_run = (
        (dash, dash, dash, dash)
        if run is None
        else (
            table_time(run.started_at),
            run.host or dash,
            run.outcome,
            human_duration(run.duration_s),
        )
    )
    return (
        s.lock,
        str(s.key),
        s.state.value,
        holder,
        dash if s.token is None else str(s.token),
        acquired,
        expires,
        renewed,
        *last_run,
        " ".join((s.command or dash).split()),  # one line, whatever the command
    )


def table_time(moment: datetime) -> str:
    """An instant in a table's cell: ``2026-11-27 02:40:01`` (UTC, to the second)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def plain_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Collection[str] = (),
) -> str:
    """Columns aligned with two spaces, for pipes, ``grep`` and ``awk``.

    The columns named in ``right`` (numbers) are aligned on the right.
    """
    widths = [len(cell) for cell in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(
            cell.rjust(w) if name in right else cell.ljust(w)
            for cell, w, name in zip(row, widths, header, strict=True)
        ).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


HISTORY_COLUMNS = (
    "STARTED (UTC)",
    "LOCK",
    "TOKEN",
    "HOST",
    "PID",
    "OUTCOME",
    "EXIT",
    "DURATION",
    "WINDOW",
    "COMMAND",
)
"""The columns of the ``history`` table; WINDOW only when a run had a window."""

_HISTORY_NUMBERS = frozenset({"TOKEN", "PID", "EXIT", "DURATION"})


def history_table(runs: Sequence[RunRecord]) -> str:
    """``history`` as plain aligned text: a header, then one line per run.

    The window column appears only when some run had a ``--once-per`` window.
    """
    if not runs:
        return "no runs recorded\n"
    with_window = any(run.window_start is not None for run in runs)
    header = [c for c in HISTORY_COLUMNS if with_window or c != "WINDOW"]
    rows = []
    for run in runs:
        cells = {
            "STARTED (UTC)": table_time(run.started_at),
            "LOCK": run.lock,
            "TOKEN": str(run.token),
            "HOST": run.host or "-",
            "PID": "-" if run.pid is None else str(run.pid),
            "OUTCOME": run.outcome,
            "EXIT": "-" if run.exit_status is None else str(run.exit_status),
            "DURATION": human_duration(run.duration_s),
            "WINDOW": iso_utc(run.window_start) or "-",
            "COMMAND": " ".join((run.command or "").split()),
        }
        rows.append([cells[column] for column in header])
    return plain_table(header, rows, right=_HISTORY_NUMBERS)


def history_document(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """``history --json``: one object per run, newest first; a stable shape.

    Each has ``lock``, ``lock_key`` (a string), ``token``, ``holder``, ``host``,
    ``pid``, ``command``, ``window``, ``started_at``, ``finished_at`` (ISO 8601
    UTC, as :func:`iso_utc`), ``duration_s``, ``exit_status`` and ``outcome``.
    """
    return [
        {
            "lock": run.lock,
            # A string: a 64-bit key loses precision as a JavaScript number.
            "lock_key": str(run.lock_key),
            "token": run.token,
            "holder": run.holder,
            "host": run.host,
            "pid": run.pid,
            "command": run.command,
            "window": iso_utc(run.window_start),
            "started_at": iso_utc(run.started_at),
            "finished_at": iso_utc(run.finished_at),
            "duration_s": _seconds(run.duration_s),
            "exit_status": run.exit_status,
            "outcome": run.outcome,
        }
        for run in runs
    ]


@dataclass(frozen=True)
class ReleaseReport:
    """What ``release`` prints and exits with."""

    message: str
    exit_code: int


def release_report(
    result: ReleaseResult, lock: LockId, token: int | None = None
) -> ReleaseReport:
    """The one-line outcome of ``release`` and its exit status.

    0 when something was released or revoked (or was revoked already), 3 when
    there was nothing to release, 75 when refused (a live lease without
    ``--force``, or a fencing token other than ``token``).
    """
    action, record = result.action, result.record
    if record is None or action is ReleaseAction.unknown:
        return ReleaseReport(
            f"{lock} has never been taken; nothing to release", EXIT_STATUS_FREE
        )
    who = f"{record.host} (pid {record.pid})"
    left_s = (record.expires_at - result.db_now).total_seconds()
    if action is ReleaseAction.changed_hands:
        return ReleaseReport(
            f"{lock} has fencing token {record.token} now, not {token}: it changed "
            "hands since; nothing released (check `leaderrun status` again)",
            EXIT_BUSY,
        )
    if action is ReleaseAction.free:
        return ReleaseReport(
            f"{lock} is already free (fencing token {record.token}); nothing to "
            "release",
            EXIT_STATUS_FREE,
        )
    if action is ReleaseAction.freed:
        return ReleaseReport(
            f"released {lock}: the lease of {who} (fencing token {record.token}) had "
            f"expired {human_duration(left_s)} ago",
            0,
        )
    if action is ReleaseAction.revoked:
        return ReleaseReport(
            f"revoked {lock} from {who} (fencing token {record.token}): it stops its "
            f"command at its next renewal and exits 122; the lock is free in "
            f"{human_duration(left_s)} at most, when the revoked lease runs out",
            0,
        )
    if action is ReleaseAction.already_revoked:
        return ReleaseReport(
            f"{lock} was already revoked from {who} (fencing token {record.token}); "
            f"it is free in {human_duration(left_s)}",
            0,
        )
    return ReleaseReport(
        f"{lock} is held by {who} (fencing token {record.token}) and its lease runs "
        f"for {human_duration(left_s)} more; not released. Use --force to revoke "
        "it: the holder then stops its command",
        EXIT_BUSY,
    )
