"""Settings: flags and environment in, one frozen object out.

Pure but for one file: the environment is passed in as a mapping, so nothing
below the command line reads ``os.environ``; the file ``LEADERRUN_DSN_FILE``
names is read here. Precedence for each option is: the flag, its
``LEADERRUN_*`` twin (both resolved by the command line), the seed library's
``LE_*`` alias (milliseconds), then the default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from leaderrun.dsnfile import DSN_FILE_ENV, read_dsn_file
from leaderrun.errors import EXIT_BUSY, ConfigError
from leaderrun.lease import LockId, Timing, make_timing, parse_lock_id
from leaderrun.redact import url_shown
from leaderrun.runs import DEFAULT_HISTORY_KEEP

if TYPE_CHECKING:
    from leaderrun.slots import OncePer

DEFAULT_SCHEMA = "public"
"""The schema of the lease table when ``--schema`` is not given."""


MAX_IDENTIFIER_BYTES = 63
"""PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)."""

SEED_ALIASES = {
    "lease_duration": "LE_LEASE_DURATION",
    "renew_interval": "LE_RENEWAL_INTERVAL",
    "jitter": "LE_JITTER_RANGE",
}
"""The seed library's environment variables (milliseconds), read as aliases."""

SEED_LOCK_ID = "LE_LOCK_ID"
"""The seed library's lock id variable."""

_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_duration(text: str, *, option: str) -> float:
    """Parse a duration such as ``250ms``, ``1.5s``, ``2m``, ``1h30m``; bare is seconds.

    Raises:
        ConfigError: naming ``option`` and the value, with the accepted forms.
    """
    value = text.strip().lower()
    if _NUMBER.fullmatch(value):
        return float(value)
    position, total_s, last_unit_s = 0, 0.0, math.inf
    for match in _PART.finditer(value):
        unit_s = _UNITS_S[match.group(2)]
        # Parts must come largest unit first, each once: 1h30m, not 30m1h or 1s1s.
        if match.start() != position or unit_s >= last_unit_s:
            break
        total_s += float(match.group(1)) * unit_s
        position, last_unit_s = match.end(), unit_s
    if value and position == len(value):
        return total_s
    raise ConfigError(
        f"{option} {text!r} is not a duration; use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


MAX_CAPTURE_BYTES = 1024 * 1024
"""The most ``--capture-output`` keeps: the tail is held in memory, stored with
the run, and sent as a ping's body (Healthchecks keeps 100 kB of it)."""

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024}
_SIZE_UNITS |= {"m": 1024**2, "mb": 1024**2, "mib": 1024**2}
_SIZE = re.compile(r"([0-9]+)\s*([a-z]*)")


def parse_size(text: str, *, option: str) -> int | None:
    """Parse a size such as ``64k``, ``512``, ``1m`` (units of 1024); 0 is None (off).

    Raises:
        ConfigError: not a size, or more than :data:`MAX_CAPTURE_BYTES`.
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ConfigError(f"{option} {text!r} is not a size; use e.g. 64k, 512 or 1m")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size > MAX_CAPTURE_BYTES:
        raise ConfigError(
            f"{option} {text!r} is more than 1m, the most kept in memory and in the "
            "run history; use e.g. 64k"
        )
    return size or None


def ping_url(text: str, *, option: str) -> str:
    """Check a monitor's ping URL (``--ping``): http or https, with a host.

    The URL holds the check's key, so a message shows only its scheme and host.

    Raises:
        ConfigError: not such a URL, naming what is wrong.
    """
    url = text.strip()
    shown = url_shown(url)
    example = "e.g. https://hc-ping.com/<uuid>"
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(
            f"{option} {shown!r} must be ASCII without spaces; percent-encode "
            "other characters"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: a bad port raises here
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{option} {shown!r} must be an http:// or https:// URL with a host, "
            + example
        )
    if parts.username is not None:
        raise ConfigError(
            f"{option} {shown!r} must not carry a user or password; the key goes "
            f"in the path, {example}"
        )
    return url


class WatchdogMode(StrEnum):
    """``--watchdog``: whether a watchdog process covers a paused leaderrun."""

    on = "on"
    """Start one; should it fail to start or die, say so and go on without it."""
    off = "off"
    """Run without one (``--no-watchdog``)."""
    required = "required"
    """Refuse to run without one, and stop the command if it dies."""


_WATCHDOG_WORDS = {
    **dict.fromkeys(("on", "true", "yes", "1"), WatchdogMode.on),
    **dict.fromkeys(("off", "false", "no", "0"), WatchdogMode.off),
    "required": WatchdogMode.required,
}


def watchdog_mode(text: str, *, option: str) -> WatchdogMode:
    """Parse ``--watchdog`` (or ``LEADERRUN_WATCHDOG``): on, off or required.

    Raises:
        ConfigError: naming ``option`` and the value, with the accepted words.
    """
    mode = _WATCHDOG_WORDS.get(text.strip().lower())
    if mode is None:
        raise ConfigError(f"{option} {text!r} must be on, off or required")
    return mode


@dataclass(frozen=True)
class RawRunOptions:
    """The run options as the command line received them: text, or None if unset."""

    lock_id: str | None = None
    dsn: str | None = None
    schema: str | None = None
    lease_duration: str | None = None
    renew_interval: str | None = None
    jitter: str | None = None
    kill_grace: str | None = None
    wait: bool = False
    wait_timeout: str | None = None
    listen_dsn: str | None = None
    busy_exit_code: int | None = None
    min_hold: str | None = None
    once_per: str | None = None
    once_per_offset: str | None = None
    schedule: str | None = None
    tz: str | None = None
    early_tolerance: str | None = None
    retry_failed: bool = False
    splay: str | None = None
    max_runtime: str | None = None
    history_keep: int | None = None
    watchdog: str = "on"
    ping: str | None = None
    capture_output: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    """How to name an option in messages when it came from elsewhere than its flag."""

    def label(self, name: str, flag: str) -> str:
        """The flag, or the environment variable the value of ``name`` came from."""
        return self.labels.get(name, flag)


@dataclass(frozen=True)
class RunSettings:
    """Everything ``leaderrun run`` needs, validated."""

    lock: LockId
    dsn: str
    dsn_source: str
    schema: str
    timing: Timing
    wait: bool
    wait_timeout_s: float | None
    busy_exit_code: int
    command: tuple[str, ...]
    min_hold_s: float = 0.0
    """``--min-hold``: the lease stays taken this long after acquiring it."""
    once_per: OncePer | None = None
    """``--once-per``/``--schedule``: at most one start per slot of database time."""
    splay_s: float = 0.0
    """``--splay``: sleep a random time below this before the first acquire."""
    max_runtime_s: float | None = None
    """``--max-runtime``: stop the command after this long and exit 124."""
    history_keep: int = DEFAULT_HISTORY_KEEP
    """``--history-keep``: runs of the lock kept in ``leader_run``."""
    watchdog: WatchdogMode = WatchdogMode.on
    """The watchdog process that stops the child if leaderrun is paused."""
    ping_url: str | None = None
    """``--ping``: the monitor's URL, pinged at the command's start and end."""
    capture_bytes: int | None = None
    """``--capture-output``: keep this many last bytes of the command's output."""
    listen_dsn: str | None = None
    """``--listen-dsn``: where a ``--wait`` contender LISTENs, if not on its lease
    connection (which PgBouncer in transaction mode cannot LISTEN on)."""


def resolve_dsn(
    dsn: str | None, env: Mapping[str, str], label: str = "--dsn"
) -> tuple[str, str]:
    """The connection string and where it came from.

    ``--dsn``/``LEADERRUN_DSN`` first, then the file ``LEADERRUN_DSN_FILE`` names,
    then ``DATABASE_URL``; otherwise the empty string, with which libpq reads its
    own ``PG*`` variables, password file and service files.

    Raises:
        ConfigError: ``LEADERRUN_DSN_FILE`` is set but unusable.
    """
    if dsn:
        return dsn, label
    if env.get(DSN_FILE_ENV):
        path = env[DSN_FILE_ENV]
        return read_dsn_file(path), f"{DSN_FILE_ENV} ({path})"
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"], "DATABASE_URL"
    return "", "the libpq environment (PGHOST, PGSERVICE, ...)"


def check_schema(schema: str, option: str = "--schema") -> str:
    """Validate a ``--schema`` name; it is always quoted as an identifier in SQL.

    Raises:
        ConfigError: empty, too long or with a NUL byte; named as ``option``.
    """
    if not schema or len(schema.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in schema:
        raise ConfigError(
            f"{option} {schema!r} must be a PostgreSQL identifier of 1 to "
            f"{MAX_IDENTIFIER_BYTES} bytes"
        )
    return schema


def lock_from(
    lock_id: str | None, env: Mapping[str, str], label: str = "--lock-id"
) -> LockId:
    """The lock from ``--lock-id`` (or its twin), else the seed's ``LE_LOCK_ID``.

    Raises:
        ConfigError: no lock id anywhere, or an invalid one.
    """
    if lock_id is None and SEED_LOCK_ID in env:
        lock_id, label = env[SEED_LOCK_ID], SEED_LOCK_ID
    if lock_id is None:
        raise ConfigError(
            "no --lock-id given; name the lock, e.g. --lock-id nightly-backup "
            "(or set LEADERRUN_LOCK_ID)"
        )
    return parse_lock_id(lock_id, option=label)


def seed_duration(text: str, *, option: str) -> float:
    """A seed ``LE_*`` duration: a bare number is milliseconds, as the seed had it.

    A value with a unit (``15s``) means what it says.
    """
    if _NUMBER.fullmatch(text.strip()):
        return float(text) / 1000
    return parse_duration(text, option=option)


def timing_from(options: RawRunOptions, env: Mapping[str, str]) -> Timing:
    """The checked timing from flags, twins and the seed's millisecond aliases."""

    def seconds(name: str, flag: str) -> float | None:
        text: str | None = getattr(options, name)
        if text is not None:
            return parse_duration(text, option=options.label(name, flag))
        alias = SEED_ALIASES.get(name)
        if alias and env.get(alias):
            return seed_duration(env[alias], option=alias)
        return None

    lease_s = seconds("lease_duration", "--lease-duration")
    renew_s = seconds("renew_interval", "--renew-interval")
    for name, flag, value in (
        ("lease_duration", "--lease-duration", lease_s),
        ("renew_interval", "--renew-interval", renew_s),
    ):
        if value == 0:
            label = options.label(name, flag)
            raise ConfigError(f"{label} must be longer than zero")
    return make_timing(
        lease_s=lease_s if lease_s is not None else make_timing().lease_s,
        renew_interval_s=renew_s,
        jitter_s=seconds("jitter", "--jitter"),
        kill_grace_s=seconds("kill_grace", "--kill-grace"),
        labels=options.labels,
    )


def run_settings(
    options: RawRunOptions,
    command: tuple[str, ...],
    env: Mapping[str, str],
    *,
    now_s: float,
) -> RunSettings:
    """Validate the run options into :class:`RunSettings`.

    ``now_s`` (the wall clock) places a ``--splay`` against the coming slots.

    Raises:
        ConfigError: the first invalid value, named with what to do instead.
    """
    if not command:
        raise ConfigError(
            "no command given; put it after --, e.g. "
            "leaderrun --lock-id nightly-backup -- ./backup.sh"
        )
    busy = EXIT_BUSY if options.busy_exit_code is None else options.busy_exit_code
    if not 0 <= busy <= 255:
        label = options.label("busy_exit_code", "--busy-exit-code")
        raise ConfigError(f"{label} {busy} must be between 0 and 255")
    wait_timeout_s = None
    if options.wait_timeout is not None:
        wait_timeout_s = parse_duration(
            options.wait_timeout, option=options.label("wait_timeout", "--wait-timeout")
        )
    dsn, source = resolve_dsn(options.dsn, env, options.label("dsn", "--dsn"))
    guards = guards_from(options, now_s=now_s)
    wait = options.wait or wait_timeout_s is not None
    listen_dsn = listen_dsn_from(options, dsn, wait=wait)
    return RunSettings(
        lock=lock_from(options.lock_id, env, options.label("lock_id", "--lock-id")),
        dsn=dsn,
        dsn_source=source,
        schema=check_schema(
            DEFAULT_SCHEMA if options.schema is None else options.schema
        ),
        timing=timing_from(options, env),
        # --wait-timeout alone implies waiting; --wait-timeout 0 is a plain try.
        wait=wait,
        wait_timeout_s=wait_timeout_s,
        busy_exit_code=busy,
        command=command,
        min_hold_s=guards.min_hold_s,
        once_per=guards.once_per,
        splay_s=guards.splay_s,
        max_runtime_s=guards.max_runtime_s,
        history_keep=guards.history_keep,
        watchdog=watchdog_mode(
            options.watchdog, option=options.label("watchdog", "--watchdog")
        ),
        ping_url=None
        if options.ping is None
        else ping_url(options.ping, option=options.label("ping", "--ping")),
        capture_bytes=None
        if options.capture_output is None
        else parse_size(
            options.capture_output,
            option=options.label("capture_output", "--capture-output"),
        ),
        listen_dsn=listen_dsn,
    )


def listen_dsn_from(options: RawRunOptions, dsn: str, *, wait: bool) -> str | None:
    """``--listen-dsn``, for a ``--wait`` contender on PostgreSQL; else None.

    Without ``--wait`` it has no use: refused as a flag, ignored from the
    environment (a crontab-wide ``LEADERRUN_LISTEN_DSN`` must not break the
    lines that skip).

    Raises:
        ConfigError: given as a flag without ``--wait``, or with a SQLite store.
    """
    text = options.listen_dsn
    if not text:
        return None
    label = options.label("listen_dsn", "--listen-dsn")
    from_flag = label == "--listen-dsn"
    if not wait:
        if from_flag:
            raise ConfigError(
                "--listen-dsn is for --wait: only a waiting contender listens; "
                "add --wait or drop --listen-dsn"
            )
        return None
    if any(d.strip().lower().startswith("sqlite:") for d in (dsn, text)):
        raise ConfigError(
            f"{label} needs PostgreSQL for the lease and for listening; a SQLite "
            "store has no notifications: drop it"
        )
    return text


@dataclass(frozen=True)
class Guards:
    """The cron guards, validated (see :class:`RunSettings` for each)."""

    min_hold_s: float
    once_per: OncePer | None
    splay_s: float
    max_runtime_s: float | None
    history_keep: int


def guards_from(options: RawRunOptions, *, now_s: float) -> Guards:
    """The cron guards: ``--min-hold``, ``--once-per``/``--schedule``, ``--splay``...

    Raises:
        ConfigError: the first invalid value, named with what to do instead.
    """

    def seconds(name: str, flag: str) -> float | None:
        text: str | None = getattr(options, name)
        if text is None:
            return None
        return parse_duration(text, option=options.label(name, flag))

    min_hold_s = seconds("min_hold", "--min-hold")
    max_runtime_s = seconds("max_runtime", "--max-runtime")
    if max_runtime_s is not None and max_runtime_s <= 0:
        label = options.label("max_runtime", "--max-runtime")
        raise ConfigError(f"{label} must be longer than zero, e.g. 30m")
    splay_s = seconds("splay", "--splay") or 0.0
    once_per = once_per_from(options)
    if once_per is not None and splay_s > 0:
        limit_s = once_per.late_limit_s(now_s)
        if splay_s >= limit_s:
            label = options.label("splay", "--splay")
            raise ConfigError(
                f"{label} {options.splay!r} could start a run after its slot ends: "
                f"with {once_per.flags()} a start may come at most {limit_s:g}s "
                "late; use a shorter splay"
            )
    keep = options.history_keep
    keep = DEFAULT_HISTORY_KEEP if keep is None else keep
    if keep < 1:
        label = options.label("history_keep", "--history-keep")
        raise ConfigError(f"{label} {keep} must be at least 1")
    return Guards(
        min_hold_s=0.0 if min_hold_s is None else min_hold_s,
        once_per=once_per,
        splay_s=splay_s,
        max_runtime_s=max_runtime_s,
        history_keep=keep,
    )


def once_per_from(options: RawRunOptions) -> OncePer | None:
    """``--once-per`` or ``--schedule``, with ``--tz`` and the early tolerance.

    Raises:
        ConfigError: both given, a companion flag without either, or a value
            that is not a window, a schedule or a zone.
    """

    def label(name: str) -> str:
        return options.label(name, "--" + name.replace("_", "-"))

    def seconds(name: str) -> float | None:
        text: str | None = getattr(options, name)
        return None if text is None else parse_duration(text, option=label(name))

    if options.once_per is not None and options.schedule is not None:
        raise ConfigError(
            f"{label('once_per')} and {label('schedule')} both given; use one: "
            "--schedule for a crontab's slots, --once-per for fixed windows"
        )
    if options.once_per is None and options.schedule is None:
        for name in ("once_per_offset", "tz", "early_tolerance", "retry_failed"):
            # A variable may be set for a whole crontab (LEADERRUN_TZ), lines
            # without a schedule included: only a flag is a mistake.
            from_environment = name in options.labels
            if getattr(options, name) not in (None, False) and not from_environment:
                raise ConfigError(
                    f"{label(name)} needs --once-per or --schedule, "
                    "e.g. --schedule '30 2 * * *'"
                )
        return None
    # Imported here: a run without a schedule does not pay for it at start-up.
    from leaderrun.slots import (
        DEFAULT_EARLY_S,
        OncePer,
        Schedule,
        ScheduleError,
        Window,
        cron_expression,
    )

    early_s = seconds("early_tolerance")
    tz = "UTC" if options.tz is None else options.tz.strip()
    try:
        if options.schedule is not None:
            if options.once_per_offset is not None:
                raise ConfigError(
                    f"{label('once_per_offset')} is for --once-per; put the time "
                    "in the schedule, e.g. --schedule '0 2 * * *'"
                )
            cadence: Window | Schedule = Schedule(cron_expression(options.schedule))
        else:
            period_s = seconds("once_per") or 0.0
            if period_s <= 0:
                raise ConfigError(
                    f"{label('once_per')} must be longer than zero, e.g. 1h or 1d"
                )
            offset_s = seconds("once_per_offset") or 0.0
            if offset_s >= period_s:
                raise ConfigError(
                    f"{label('once_per_offset')} {options.once_per_offset!r} must be "
                    f"shorter than {label('once_per')} {options.once_per!r}; e.g. "
                    "--once-per 1d --once-per-offset 2h for windows from 02:00"
                )
            cadence = Window(period_s, offset_s)
        return OncePer(
            cadence,
            retry_failed=options.retry_failed,
            tz=tz,
            early_s=DEFAULT_EARLY_S if early_s is None else early_s,
        )
    except ScheduleError as exc:
        given = options.once_per if exc.option == "once_per" else None
        text = {"tz": tz, "early_tolerance": options.early_tolerance}.get(
            exc.option, given or options.schedule
        )
        raise ConfigError(f"{label(exc.option)} {text!r}: {exc}") from None
