"""Which slot a start belongs to: ``--once-per`` windows and ``--schedule`` slots.

Pure: every function takes the moment it reasons about (seconds since the Unix
epoch) and reads no clock. The store decides with its own clock which slot its
now falls in (PostgreSQL from a table of slots built here, see :meth:`OncePer.table`;
SQLite and the in-memory store by :meth:`OncePer.slot_at`).

A cadence lists *slot starts*, the moments a run is due: every ``period`` after
``offset`` (:class:`Window`), or the times a five-field cron line fires
(:class:`Schedule`). A start that reaches the store at ``now`` belongs to the
latest slot that has *opened* by then, and a slot opens a little before its
start, the *early tolerance*::

                 opens   start                       opens   start
    ... slot k-1   |<-tol->|  slot k  ....................|<-tol->|  slot k+1 ...
                   ^ a start from here on is slot k's ... ^ from here on, slot k+1's

so a node whose clock runs ahead of the store's, or a cron that fires a moment
early, still lands in the slot it was fired for; a late start stays in its slot
until the next one opens. The tolerance is ``early_s`` but at most a quarter of
the time since the previous slot (:data:`EARLY_FRACTION`), so that a start a
little late for one slot never counts for the next.

Time zones (``tz``): a schedule fires on that zone's wall clock, through its
daylight-saving changes as Debian's and Red Hat's cron do (cronie/Vixie rules,
implemented by ``cronsim``, a library written for healthchecks.io's schedule
checks): a fixed-time job whose time is skipped in spring runs once, right
after the change; one whose time repeats in autumn runs once, at the first
occurrence; jobs with ``*`` in the minute or hour field run by elapsed time.
Windows of a day or longer follow the zone's calendar (a day is 23 or 25 hours
at a change; ``--once-per-offset 3h`` means 03:00 local), under the same rules;
shorter windows are fixed lengths of elapsed time on the epoch's grid, in
every zone.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from typing import Any

DEFAULT_EARLY_S = 120.0
"""The early tolerance when none is given: 2 minutes (capped, see below)."""

EARLY_FRACTION = 0.25
"""The tolerance never exceeds this part of the time since the previous slot."""

DAY_S = 86400.0

TABLE_SPAN_S = 600.0
"""How far around its guess of the store's now a slot table reaches, at most."""

TABLE_PERIODS = 16
"""A slot table of short windows reaches this many periods each side instead."""

DST_SPAN_S = 3 * 3600.0
"""More than any daylight-saving shift: how far cron's wall-clock rules can
move a fixed-time job, so how far around a moment the search looks."""

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The crontab(5) nicknames and the five fields each stands for."""

_EPOCH_DAY = date(1970, 1, 1).toordinal()


class ScheduleError(ValueError):
    """A schedule, time zone or window that cannot be used, and why.

    ``option`` names what was wrong (``schedule``, ``once_per``, ``tz`` or
    ``early_tolerance``), so that the caller can name the value it came from.
    """

    def __init__(self, message: str, option: str = "schedule") -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Window:
    """``--once-per``: a slot every ``period_s``, starting ``offset_s`` after the epoch.

    Args:
        period_s: the window length, in seconds.
        offset_s: where windows start, after the multiples of ``period_s``
            since the Unix epoch (``0 <= offset_s < period_s``); in a time zone
            other than UTC, a window of whole days starts at that local time.
    """

    period_s: float
    offset_s: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The cadence as recorded with the lock (JSON)."""
        return {"once_per_s": self.period_s, "offset_s": self.offset_s}


@dataclass(frozen=True)
class Schedule:
    """``--schedule``: a slot at every time a five-field cron line fires."""

    cron: str

    def describe(self) -> dict[str, Any]:
        """The cadence as recorded with the lock (JSON)."""
        return {"schedule": self.cron}


Cadence = Window | Schedule


@dataclass(frozen=True)
class Slot:
    """One slot: when a run is due (``start_s``) and when starts begin to count for it.

    ``opens_s`` is ``start_s`` less the early tolerance at this slot.
    """

    start_s: float
    opens_s: float


@dataclass(frozen=True)
class SlotTable:
    """The slots around a guess of the store's now, for a store to choose from.

    For any store time ``t`` with ``slots[0].opens_s <= t < until_s``, the
    slot of ``t`` is the last one whose ``opens_s <= t``. Outside that range the
    table cannot say, and a new one must be built around the store's own now.
    """

    slots: tuple[Slot, ...]
    until_s: float

    def slot_at(self, now_s: float) -> Slot | None:
        """The slot of store time ``now_s``, or None if the table does not cover it."""
        if not self.slots or not self.slots[0].opens_s <= now_s < self.until_s:
            return None
        return [slot for slot in self.slots if slot.opens_s <= now_s][-1]


@dataclass(frozen=True)
class OncePer:
    """At most one start per slot of a cadence, in store time.

    Args:
        cadence: the slots: fixed windows or a cron schedule.
        retry_failed: whether a slot whose run failed, timed out, was killed
            or was lost may start again (off: at most one start, whatever
            happened to it).
        tz: the IANA time zone a schedule and day-sized windows follow.
        early_s: the early tolerance (see the module's docs).

    Raises:
        ScheduleError: the zone is unknown, the schedule is not a five-field
            cron line that ever fires, or the window does not fit the zone.
    """

    cadence: Cadence
    retry_failed: bool = False
    tz: str = "UTC"
    early_s: float = DEFAULT_EARLY_S

    def __post_init__(self) -> None:
        zone_of(self.tz)  # a bad name fails here, not at the first acquire
        if not (math.isfinite(self.early_s) and self.early_s >= 0):
            raise ScheduleError("must be 0 or more", "early_tolerance")
        if isinstance(self.cadence, Schedule):
            _check_cron(self.cadence.cron)
            return
        period_s, offset_s = self.cadence.period_s, self.cadence.offset_s
        if not (math.isfinite(period_s) and period_s > 0):
            raise ScheduleError("a window must be longer than zero", "once_per")
        if not 0 <= offset_s < period_s:
            raise ScheduleError(
                f"the offset must be in [0, {period_s:g}s), not {offset_s:g}s",
                "once_per",
            )
        if self._calendar and (period_s % DAY_S or offset_s % 60):
            raise ScheduleError(
                f"in {self.tz}, a window of a day or longer must be whole days "
                "and start on a whole minute",
                "once_per",
            )

    @property
    def zone(self) -> tzinfo:
        """The time zone, from the system's data or the ``tzdata`` package."""
        return zone_of(self.tz)

    @property
    def _calendar(self) -> bool:
        """Windows that follow the zone's calendar: a day or longer, not in UTC."""
        return (
            isinstance(self.cadence, Window)
            and self.zone is not UTC
            and self.cadence.period_s >= DAY_S
        )

    # --- the slots -------------------------------------------------------------------

    def slot_at(self, now_s: float) -> Slot:
        """The slot that a start reaching the store at ``now_s`` belongs to."""
        return self.slots(now_s, now_s)[0]

    def slots(self, lo_s: float, hi_s: float) -> list[Slot]:
        """The slot of ``lo_s``, then every slot that opens in ``(lo_s, hi_s]``."""
        first = self._start_at_or_before(lo_s)
        previous = self._start_before(first)
        # No slot opens earlier than this before its start (windows are even).
        most_s = self.early_s
        if isinstance(self.cadence, Window):
            most_s = min(most_s, self.cadence.period_s * EARLY_FRACTION)
        slots: list[Slot] = []
        for start_s in itertools.chain([first], self._starts_after(first)):
            tolerance_s = min(self.early_s, (start_s - previous) * EARLY_FRACTION)
            slots.append(Slot(start_s, start_s - tolerance_s))
            previous = start_s
            if start_s - most_s > hi_s:
                break  # this one and every later one opens after hi_s
        # The next slot may already have opened at lo_s; two never can, since a
        # slot opens at most a quarter of the way back to the one before.
        if len(slots) > 1 and slots[1].opens_s <= lo_s:
            slots.pop(0)
        return [slots[0], *(s for s in slots[1:] if s.opens_s <= hi_s)]

    def table(self, around_s: float) -> SlotTable:
        """The slots a store whose now is near ``around_s`` chooses from."""
        span_s = TABLE_SPAN_S
        if isinstance(self.cadence, Window):
            span_s = min(span_s, TABLE_PERIODS * self.cadence.period_s)
        lo_s, hi_s = around_s - span_s, around_s + span_s
        return SlotTable(tuple(self.slots(lo_s, hi_s)), hi_s)

    def late_limit_s(self, from_s: float, count: int = 1000) -> float:
        """How late a start may come and stay in its slot, for the next ``count`` slots.

        The least, over those slots, of the time from a slot's start to the
        opening of the next; ``--splay`` must stay below it.
        """
        slots = self.slots(from_s, from_s)
        starts = self._starts_after(slots[0].start_s)
        limit_s = math.inf
        current = slots[0].start_s
        for _ in range(count):
            following = next(starts, None)
            if following is None:
                break
            tolerance_s = min(self.early_s, (following - current) * EARLY_FRACTION)
            limit_s = min(limit_s, following - tolerance_s - current)
            current = following
        return limit_s

    def local(self, start_s: float) -> datetime:
        """A slot's start in the zone, for ``LEADERRUN_SLOT`` and messages."""
        return datetime.fromtimestamp(start_s, self.zone)

    def describe(self) -> str:
        """The cadence as the lock records it: compact JSON, for status and checks."""
        document = {
            **self.cadence.describe(),
            "tz": self.tz,
            "early_s": self.early_s,
            "retry_failed": self.retry_failed,
        }
        return json.dumps(document, separators=(",", ":"))

    def flags(self) -> str:
        """The flags that give this cadence, for messages."""
        if isinstance(self.cadence, Schedule):
            text = f"--schedule '{self.cadence.cron}'"
        else:
            text = f"--once-per {_seconds(self.cadence.period_s)}"
            if self.cadence.offset_s:
                text += f" --once-per-offset {_seconds(self.cadence.offset_s)}"
        return text if self.tz == "UTC" else f"{text} --tz {self.tz}"

    # --- the starts ------------------------------------------------------------------

    @property
    def _reordered(self) -> bool:
        """Whether cron's wall-clock rules may move a start by up to a DST shift.

        cronsim applies them (as Debian's cron does) to fixed-time jobs in a
        zone other than UTC: both fields minute and hour without a ``*``.
        """
        if self.zone is UTC:
            return False
        if isinstance(self.cadence, Window):
            return True
        minute, hour = self.cadence.cron.split()[:2]
        return not (minute.startswith("*") or hour.startswith("*"))

    def _start_at_or_before(self, t_s: float) -> float:
        """The latest slot start at or before ``t_s``."""
        if isinstance(self.cadence, Window) and not self._calendar:
            p, o = self.cadence.period_s, self.cadence.offset_s
            return math.floor((t_s - o) / p) * p + o
        margin_s = DST_SPAN_S if self._reordered else 0.0
        best = None
        for start_s in self._cron(t_s + margin_s, reverse=True):
            if start_s <= t_s and (best is None or start_s > best):
                best = start_s
            # Past a DST shift below the best, nothing later than it can come.
            if best is not None and start_s <= best - margin_s:
                break
        if best is None:
            raise ScheduleError("never fires")
        return best

    def _start_before(self, t_s: float) -> float:
        """The latest slot start before ``t_s``; far in the past if there is none."""
        try:
            return self._start_at_or_before(math.nextafter(t_s, -math.inf))
        except ScheduleError:
            return -math.inf

    def _starts_after(self, t_s: float) -> Iterator[float]:
        """Every slot start after ``t_s``, in order."""
        if isinstance(self.cadence, Window) and not self._calendar:
            p, o = self.cadence.period_s, self.cadence.offset_s
            k = math.floor((t_s - o) / p) + 1
            while True:
                start_s = k * p + o
                if start_s > t_s:
                    yield start_s
                k += 1
        # A start moved by cron's wall-clock rules may come before t_s:
        # look from a DST shift earlier, and keep only what is later.
        last = t_s
        margin_s = DST_SPAN_S if self._reordered else 0.0
        for start_s in self._cron(t_s - margin_s):
            if start_s > last:
                last = start_s
                yield start_s

    def _cron(self, from_s: float, *, reverse: bool = False) -> Iterator[float]:
        """The cron starts from ``from_s`` on (or back), as epoch seconds."""
        from cronsim import CronSim

        if isinstance(self.cadence, Schedule):
            expression, every_days, phase = self.cadence.cron, 1, 0
        else:
            days, wall_s = divmod(int(self.cadence.offset_s), int(DAY_S))
            expression = f"{wall_s % 3600 // 60} {wall_s // 3600} * * *"
            every_days, phase = int(self.cadence.period_s // DAY_S), days
        moments = CronSim(
            expression, datetime.fromtimestamp(from_s, self.zone), reverse
        )
        for moment in moments:
            # A window of n days starts on every n-th local day from the epoch.
            if (moment.toordinal() - _EPOCH_DAY - phase) % every_days == 0:
                yield moment.timestamp()


@functools.lru_cache(maxsize=8)
def zone_of(name: str) -> tzinfo:
    """The IANA time zone ``name``, from the system's data or ``tzdata``.

    Raises:
        ScheduleError: no such zone.
    """
    if name in ("UTC", "Etc/UTC"):
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            "unknown time zone; use an IANA name such as Europe/Berlin or "
            "America/New_York",
            "tz",
        ) from None


def _check_cron(expression: str) -> None:
    """Refuse what cron could not run: not five fields, or never firing."""
    from cronsim import CronSim, CronSimError

    fields = expression.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"has {len(fields)} fields; give the crontab line's five "
            "(minute hour day-of-month month day-of-week), e.g. '30 2 * * *'"
        )
    try:
        next(CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC)))
    except CronSimError as exc:
        raise ScheduleError(f"{str(exc).lower()}; see crontab(5)") from None
    except StopIteration:
        raise ScheduleError("never fires; see crontab(5)") from None


def cron_expression(text: str) -> str:
    """A schedule as given (five fields or a nickname such as ``@daily``), normalised.

    Raises:
        ScheduleError: ``@reboot``, which has no slots, or an unknown nickname.
    """
    words = text.split()
    if len(words) == 1 and words[0].startswith("@"):
        nickname = words[0].lower()
        if nickname not in NICKNAMES:
            raise ScheduleError(
                "has no slots to run once in; use five fields or one of "
                + ", ".join(NICKNAMES)
            )
        return NICKNAMES[nickname]
    return " ".join(words)


def _seconds(value_s: float) -> str:
    """A duration as a flag takes it, in the largest unit that divides it."""
    for unit, size_s in (("d", DAY_S), ("h", 3600.0), ("m", 60.0)):
        if value_s >= size_s and value_s % size_s == 0:
            return f"{value_s / size_s:g}{unit}"
    return f"{value_s:g}s"
