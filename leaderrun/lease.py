"""The pure core: lease timing, its safety inequality, lock ids and holder names.

Nothing here reads a clock, sleeps or does I/O. Every instant is a float in
seconds on the caller's ``CLOCK_BOOTTIME`` and is passed in, so each decision can
be tested at its boundaries without waiting.

The safety argument (``docs/safety.md``, and ``lease-safety.md`` section 1.4 of the
design research): the database writes ``expires_at = now() + lease``, and its
``now()`` is read *after* the holder sampled ``t_sent`` just before sending the
statement. So no contender can take the lease before real time
``t_sent + lease - margin``. The holder's clock may run slow by up to a factor
``1 + rho``; the child's whole process group must be confirmed dead before then::

    (1 + rho) * (kill_deadline + kill_grace + kill_confirm) <= lease - margin

which gives the kill deadline, counted from ``t_sent``::

    kill_deadline = (lease - margin) / (1 + rho) - kill_grace - kill_confirm

and, so that a renewal gets at least two attempts before the kill (liveness)::

    renew_interval + jitter + 2 * attempt_budget <= kill_deadline
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from leaderrun.errors import ConfigError, UnsafeTimingError

CLOCK_RATE_BOUND = 1e-3
"""rho: how much faster the database clock may run than ours (NTP slews <= 500 ppm)."""

DB_CLOCK_STEP_FLOOR_S = 0.5
"""The smallest allowance (seconds) for the database clock stepping forward."""

DB_CLOCK_STEP_FRACTION = 0.02
"""The allowance for a database clock step grows with the lease: 2 % of it."""

KILL_CONFIRM_S = 0.5
"""K: seconds to deliver SIGKILL, reap, and see the group empty (one tick included)."""

SUPERVISOR_TICK_S = 0.1
"""W: the supervisor re-checks the deadline at least this often (seconds)."""

MIN_ATTEMPT_BUDGET_S = 0.5
"""The shortest per-attempt budget (seconds) for a renewal that we accept."""

MAX_ATTEMPT_BUDGET_S = 5.0
"""A renewal attempt is never given more than this (seconds), however long the lease."""

MIN_RETRY_S = 0.05
"""The shortest sleep (seconds) between two acquire attempts of a waiting contender."""

DEFAULT_LEASE_S = 30.0
"""The default lease duration (seconds)."""

DEFAULT_KILL_GRACE_CAP_S = 5.0
"""The default kill grace is lease/6, but never more than this (seconds)."""

MAX_NAME_LENGTH = 200
"""The longest lock name accepted (characters)."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Timing:
    """The lease timing a holder runs with, all in seconds.

    Build it with :func:`make_timing`, which fills in the defaults that follow
    from the lease duration and checks the safety inequality.
    """

    lease_s: float
    renew_interval_s: float
    jitter_s: float
    kill_grace_s: float

    @property
    def db_clock_margin_s(self) -> float:
        """Epsilon: the allowance for the database clock stepping forward."""
        return max(DB_CLOCK_STEP_FLOOR_S, DB_CLOCK_STEP_FRACTION * self.lease_s)

    @property
    def kill_deadline_s(self) -> float:
        """D_term: seconds after ``t_sent`` at which SIGTERM goes to the group."""
        usable_s = (self.lease_s - self.db_clock_margin_s) / (1 + CLOCK_RATE_BOUND)
        return usable_s - self.kill_grace_s - KILL_CONFIRM_S

    @property
    def attempt_budget_s(self) -> float:
        """A: how long one renewal attempt may take before it is abandoned."""
        slack_s = self.kill_deadline_s - self.renew_interval_s - self.jitter_s
        return min(MAX_ATTEMPT_BUDGET_S, slack_s / 2)

    @property
    def outage_tolerance_s(self) -> float:
        """The longest database outage that never stops a child, at worst."""
        return max(0.0, self.kill_deadline_s - self.renew_interval_s - self.jitter_s)


TIMING_FLAGS = {
    "lease_duration": "--lease-duration",
    "renew_interval": "--renew-interval",
    "jitter": "--jitter",
    "kill_grace": "--kill-grace",
}
"""How messages name each timing option unless told otherwise: its flag."""


def make_timing(
    lease_s: float = DEFAULT_LEASE_S,
    renew_interval_s: float | None = None,
    jitter_s: float | None = None,
    kill_grace_s: float | None = None,
    *,
    labels: Mapping[str, str] | None = None,
) -> Timing:
    """Build a checked :class:`Timing`, deriving the options not given.

    Defaults follow the lease: renew every ``lease/6``, jitter up to a fifth of
    that, and a kill grace of ``lease/6`` capped at 5 s. With the 30 s default
    lease that is 5 s, 1 s and 5 s. ``labels`` names options in messages (keys
    as in :data:`TIMING_FLAGS`; e.g. the library's parameter names), else
    their flags.

    Raises:
        ConfigError: a value is out of range.
        UnsafeTimingError: the combination violates the safety inequality; the
            message names the inequality and a lease duration that would work.
    """

    def name(option: str) -> str:
        return (labels or {}).get(option, TIMING_FLAGS[option])

    if not (math.isfinite(lease_s) and lease_s > 0):
        raise ConfigError(f"{name('lease_duration')} must be positive, not {lease_s!r}")
    for option, value in (
        ("renew_interval", renew_interval_s),
        ("jitter", jitter_s),
        ("kill_grace", kill_grace_s),
    ):
        if value is None:
            continue
        if option == "renew_interval" and not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"{name(option)} must be a positive duration, not {value!r}"
            )
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"{name(option)} must be zero or a positive duration, not {value!r}"
            )
    timing = _derive(lease_s, renew_interval_s, jitter_s, kill_grace_s)
    problem = timing_problem(timing)
    if problem is not None:
        suggestion = _shortest_safe_lease_s(renew_interval_s, jitter_s, kill_grace_s)
        if suggestion is not None:
            label = name("lease_duration")
            # A Python parameter (lease_s) takes seconds as a number; a flag or
            # a variable takes a duration.
            given = (
                f"={round(suggestion, 3):g}"
                if label.isidentifier() and label.islower()
                else f" {_fmt(suggestion)}"
            )
            problem += f"; use {label}{given} or more"
        raise UnsafeTimingError(
            f"{problem}, or a shorter {name('renew_interval')}, {name('jitter')} "
            f"or {name('kill_grace')}"
        )
    return timing


def _derive(
    lease_s: float,
    renew_interval_s: float | None,
    jitter_s: float | None,
    kill_grace_s: float | None,
) -> Timing:
    renew_s = lease_s / 6 if renew_interval_s is None else renew_interval_s
    return Timing(
        lease_s=lease_s,
        renew_interval_s=renew_s,
        jitter_s=renew_s / 5 if jitter_s is None else jitter_s,
        kill_grace_s=(
            min(DEFAULT_KILL_GRACE_CAP_S, lease_s / 6)
            if kill_grace_s is None
            else kill_grace_s
        ),
    )


def _shortest_safe_lease_s(
    renew_interval_s: float | None,
    jitter_s: float | None,
    kill_grace_s: float | None,
) -> float | None:
    """The shortest lease, in steps of 0.1 s, that is safe with the explicit values.

    Derived values grow with the lease, and the slack grows faster than they do,
    so safety is monotonic in the lease: bisect.
    """

    def safe(tenths: int) -> bool:
        timing = _derive(tenths / 10, renew_interval_s, jitter_s, kill_grace_s)
        return timing_problem(timing) is None

    low, high = 0, 1
    while not safe(high):
        low, high = high, high * 2
        if high > 10 * 365 * 86400 * 10:  # ten years: no sensible lease
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if safe(middle) else (middle, high)
    return high / 10


def timing_problem(timing: Timing) -> str | None:
    """The violated safety inequality with its numbers, or None when it is safe."""
    t = timing
    need_s = t.renew_interval_s + t.jitter_s + 2 * MIN_ATTEMPT_BUDGET_S
    if t.kill_deadline_s >= need_s:
        return None
    return (
        "unsafe timing: renew-interval + jitter + 2 x attempt budget "
        f"({_fmt(t.renew_interval_s)} + {_fmt(t.jitter_s)} + "
        f"2 x {_fmt(MIN_ATTEMPT_BUDGET_S)} = {_fmt(need_s)}) must not exceed the kill "
        "deadline (lease - margin)/(1 + rho) - kill-grace - kill-confirm = "
        f"({_fmt(t.lease_s)} - {_fmt(t.db_clock_margin_s)})/{1 + CLOCK_RATE_BOUND:g}"
        f" - {_fmt(t.kill_grace_s)} - {_fmt(KILL_CONFIRM_S)} = "
        f"{_fmt(t.kill_deadline_s)}"
    )


def kill_deadline(t_sent_s: float, timing: Timing) -> float:
    """The instant the child must get SIGTERM if nothing renews after ``t_sent_s``."""
    return t_sent_s + timing.kill_deadline_s


def reply_in_time(t_sent_s: float, now_s: float, timing: Timing) -> bool:
    """Whether a successful reply to a statement sent at ``t_sent_s`` still counts.

    A reply that arrives when its own deadline has passed is a failure: the kill
    may already be under way, and nothing may reverse it.
    """
    return now_s < kill_deadline(t_sent_s, timing)


def renewal_delay_s(timing: Timing, unit_random: float) -> float:
    """How long to sleep before the next renewal; ``unit_random`` is in [0, 1)."""
    return timing.renew_interval_s + unit_random * timing.jitter_s


QUEUE_PLACE_LEASES = 2.0
"""How long a waiter's place in the ``--wait`` queue lasts, in its own leases.

Each attempt renews the place, and a queued waiter attempts at least once a
lease (:func:`retry_delay_s`), so a place lapses only when its waiter has been
gone (dead, or cut off) for a lease or more; then the next in line goes first.
"""


def retry_delay_s(
    holder_expires_in_s: float | None,
    timing: Timing,
    unit_random: float,
    *,
    turn_in_s: float | None = None,
    queued: bool = False,
) -> float:
    """How long a waiting contender sleeps before its next acquire attempt.

    It sleeps until the current holder's lease ends as the database reports it,
    plus up to ``jitter`` so that waiters spread out. ``None`` (the row vanished
    or was just created by someone else) retries after the minimum. A queued
    waiter with another ahead of it (``turn_in_s``) waits for that place to
    lapse instead (a release to the one ahead wakes nobody else); and a queued
    waiter tries at least once a lease, which keeps its place.
    """
    until_s = holder_expires_in_s if turn_in_s is None else turn_in_s
    base_s = max(until_s or 0.0, 0.0)
    delay_s = max(MIN_RETRY_S, base_s + unit_random * timing.jitter_s)
    return min(delay_s, timing.lease_s) if queued else delay_s


@dataclass(frozen=True)
class LockId:
    """A lock: its 64-bit key in the table, and the name it was given, if any."""

    key: int
    name: str | None = None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.key)


def parse_lock_id(text: str, option: str = "--lock-id") -> LockId:
    """Parse ``--lock-id``: a 64-bit integer, or a name hashed to one.

    Raises:
        ConfigError: the value is empty, too long or has control characters.
    """
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped):
        key = int(stripped)
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise ConfigError(
                f"{option} {text!r} does not fit in 64 bits; use a smaller number "
                "or a name"
            )
        return LockId(key)
    if not stripped or stripped != text:
        raise ConfigError(
            f"{option} {text!r} must be an integer or a name without leading or "
            "trailing spaces"
        )
    if len(text) > MAX_NAME_LENGTH or not text.isprintable():
        raise ConfigError(
            f"{option} {text[:40]!r} must be at most {MAX_NAME_LENGTH} printable "
            "characters"
        )
    return LockId(name_key(text), text)


def name_key(name: str) -> int:
    """The signed 64-bit key of a lock name: the first 8 bytes of its SHA-256."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def make_holder(host: str, pid: int, nonce: str) -> str:
    """A holder identity unique to one process start: ``host:pid:nonce``.

    A restarted leaderrun gets a new nonce, so it can never renew or release the
    lease of its predecessor, whose orphaned child may still be alive.
    """
    return f"{host}:{pid}:{nonce}"


@dataclass(frozen=True)
class Lease:
    """A lease this process holds: the lock, who we are, and our fencing token."""

    lock: LockId
    holder: str
    token: int


def _fmt(seconds: float) -> str:
    """Seconds as a short human string: ``5s``, ``0.667s``."""
    text = f"{round(seconds, 3) + 0.0:.3f}".rstrip("0").rstrip(".")  # + 0.0: no -0
    return f"{text}s"
