"""The command line: a thin typer app over the library, with one error boundary.

The only module that imports typer or rich. ``leaderrun --lock-id X -- cmd`` and
``leaderrun run --lock-id X -- cmd`` are the same; ``main()`` routes the bare
form to ``run``. Usage errors exit 64, not click's 2, which children use.

No ``from __future__ import annotations`` here: typer reads each command's
options from its signature, and annotations kept as strings would be compiled
again by ``eval`` on every start (about 5 ms for ``run``'s, paid on every node).
"""

import contextlib
import copy
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.main import get_command

from leaderrun import __version__
from leaderrun.config import (
    DEFAULT_SCHEMA,
    RawRunOptions,
    check_schema,
    lock_from,
    parse_duration,
    resolve_dsn,
    run_settings,
)
from leaderrun.errors import (
    EXIT_INTERNAL,
    EXIT_STATUS_FREE,
    EXIT_USAGE,
    BusyError,
    ConfigError,
    LeaderrunError,
    signal_status,
)
from leaderrun.lease import parse_lock_id
from leaderrun.logsink import SinkHandler, stderr_sink
from leaderrun.redact import MASK, dsn_secrets, redact, url_secrets

if TYPE_CHECKING:
    from leaderrun import views
    from leaderrun.lease import LockId
    from leaderrun.runs import RunRecord
    from leaderrun.stores import ManagedStore
    from leaderrun.stores.base import LeaseSnapshot, RunOutput

SUBCOMMANDS = ("run", "status", "release", "init", "history", "check", "metrics")
"""Every subcommand; any other first argument is the bare form of ``run``."""

_TOP_LEVEL_FLAGS = (
    "-h",
    "--help",
    "--version",
    "--install-completion",
    "--show-completion",
)

log = logging.getLogger("leaderrun")


class LogFormat(StrEnum):
    """How leaderrun writes its own messages to stderr."""

    text = "text"
    json = "json"


app = typer.Typer(
    name="leaderrun",
    help=(
        "Run a command on exactly one node at a time, with a PostgreSQL lease as "
        "the referee.\n\n"
        "leaderrun --lock-id nightly-backup -- ./backup.sh"
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich help would import rich (~40 ms) on --help.
    rich_markup_mode=None,
)

# Options shared by every subcommand that talks to the database.
DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="LEADERRUN_DSN",
        help="libpq connection string or URI; falls back to the file "
        "LEADERRUN_DSN_FILE names (mode 0600), DATABASE_URL, then libpq's PG* "
        "variables and service files. Keep passwords in PGPASSFILE or that file. "
        "sqlite:///PATH uses a SQLite file instead, for the processes of one host.",
        show_default=False,
    ),
]
SchemaOption = Annotated[
    str,
    typer.Option(
        "--schema", envvar="LEADERRUN_SCHEMA", help="Schema of the leader_lease table."
    ),
]
VerboseOption = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        help="More messages (-v: progress, -vv: debug); tracebacks on errors.",
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")
]
LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        envvar="LEADERRUN_LOG_FORMAT",
        help="text: 'leaderrun: <message>' lines; json: one object per line.",
    ),
]


class _Formatter(logging.Formatter):
    """``leaderrun: <message>`` or a JSON object, with every secret masked."""

    def __init__(self, log_format: LogFormat, secrets: list[str]) -> None:
        super().__init__()
        self.log_format = log_format
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage(), self.secrets)
        if self.log_format is LogFormat.json:
            entry: dict[str, object] = {
                "time": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)
                ),
                "level": record.levelname.lower(),
                "event": getattr(record, "event", "message"),
                "message": message,
                "pid": os.getpid(),
            }
            for key in ("token", "status"):
                if hasattr(record, key):
                    entry[key] = getattr(record, key)
            return json.dumps(entry)
        text = f"leaderrun: {message}"
        if record.exc_info and log.isEnabledFor(logging.INFO):
            text += "\n" + redact(self.formatException(record.exc_info), self.secrets)
        return text


class _State:
    """What the error boundary needs to know about the current invocation."""

    verbose = 0
    log_format = LogFormat.text
    secrets: list[str] = []  # noqa: RUF012 - replaced, never mutated


def _dropped_notice(dropped: int) -> bytes:
    """The line that says how many messages a stalled stderr cost, in our format."""
    return _error_line(
        f"{dropped} message(s) dropped: stderr was not being read", "dropped"
    ).encode()


def _error_line(message: str, event: str = "error") -> str:
    """One error line of our own, formatted as every log line is (text or JSON).

    Also before logging is set up (a usage error), in the requested format.
    """
    record = logging.makeLogRecord(
        {
            "name": log.name,
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": message,
            "event": event,
        }
    )
    return _Formatter(_State.log_format, _State.secrets).format(record) + "\n"


def _setup_logging(
    verbose: int,
    quiet: bool,
    log_format: LogFormat,
    dsn: str,
    secrets: Sequence[str] = (),
) -> None:
    _State.verbose = verbose
    _State.log_format = log_format
    _State.secrets = sorted([*dsn_secrets(dsn), *secrets], key=len, reverse=True)
    # Never a StreamHandler: a stalled stderr must not block the thread that
    # logs, which may be about to stop the child (leaderrun.logsink).
    sink = stderr_sink()
    sink.notice = _dropped_notice
    handler = SinkHandler(sink)
    handler.setFormatter(_Formatter(log_format, _State.secrets))
    log.handlers[:] = [handler]
    log.propagate = False
    if quiet:
        log.setLevel(logging.ERROR)
    else:
        log.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))


def collect_from_here() -> None:
    """Turn the garbage collector back on, if start-up turned it off.

    ``python -m leaderrun`` and the ``leaderrun`` script start with it off
    (``leaderrun.__main__``). What start-up built lives as long as the process:
    frozen, it is never scanned again (and the watchdog and the command, forked
    later, share more of its pages). The few hundred cycles start-up left
    behind are kept, some 100 KB. Called by every command once its modules are
    loaded, before it does anything that may last.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _start(
    dsn: str | None,
    verbose: int,
    quiet: bool,
    log_format: LogFormat,
    secrets: Sequence[str] = (),
    *,
    loaded: bool = True,
) -> tuple[dict[str, str], str]:
    """The environment and the resolved DSN; logging masks it and ``secrets``.

    ``loaded``: the command needs no more modules; ``run``, which imports the
    driver next, says False and turns the collector on itself.
    """
    if loaded:
        collect_from_here()
    env = dict(os.environ)
    dsn_value, _ = resolve_dsn(dsn, env)
    _setup_logging(verbose, quiet, log_format, dsn_value, secrets)
    return env, dsn_value


def _operator_store(dsn: str, schema: str, env: Mapping[str, str]) -> "ManagedStore":
    """The store for status, release and history, which never create the tables."""
    # Imported here: psycopg costs ~100 ms, which --help and bad flags need not pay.
    from leaderrun.stores import open_store

    return open_store(dsn, check_schema(schema), env, create=False)


def _labels(ctx: typer.Context) -> dict[str, str]:
    """For every option set from the environment, its variable, to name in messages."""
    labels: dict[str, str] = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name or "")
        envvar = getattr(param, "envvar", None)
        if source is not None and source.name == "ENVIRONMENT" and envvar:
            labels[param.name or ""] = envvar if isinstance(envvar, str) else envvar[0]
    return labels


def _print_version(value: bool) -> None:
    # A parameter callback, not the group's body: the body never runs without a
    # subcommand, and `leaderrun --version` has none.
    if value:
        typer.echo(f"leaderrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _top(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """Run a command on exactly one node at a time."""


@app.command(
    "run",
    context_settings={"allow_interspersed_args": False},
    no_args_is_help=True,
)
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- COMMAND [ARG]...", show_default=False),
    ] = None,
    lock_id: Annotated[
        str | None,
        typer.Option(
            "--lock-id",
            envvar="LEADERRUN_LOCK_ID",
            help="The lock: an integer, or a name such as nightly-backup.",
            show_default=False,
        ),
    ] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    lease_duration: Annotated[
        str | None,
        typer.Option(
            "--lease-duration",
            envvar="LEADERRUN_LEASE_DURATION",
            help="Lease length in database time (250ms, 10s, 2m). [default: 30s]",
            show_default=False,
        ),
    ] = None,
    renew_interval: Annotated[
        str | None,
        typer.Option(
            "--renew-interval",
            envvar="LEADERRUN_RENEW_INTERVAL",
            help="Time between renewals. [default: lease/6]",
            show_default=False,
        ),
    ] = None,
    jitter: Annotated[
        str | None,
        typer.Option(
            "--jitter",
            envvar="LEADERRUN_JITTER",
            help="Random delay of up to this much added to each renewal and retry. "
            "[default: renew-interval/5]",
            show_default=False,
        ),
    ] = None,
    kill_grace: Annotated[
        str | None,
        typer.Option(
            "--kill-grace",
            envvar="LEADERRUN_KILL_GRACE",
            help="SIGTERM to SIGKILL when leaderrun stops the command. "
            "[default: lease/6, at most 5s]",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            envvar="LEADERRUN_WAIT",
            help="Wait for the lock instead of exiting 75 when it is held.",
        ),
    ] = False,
    wait_timeout: Annotated[
        str | None,
        typer.Option(
            "--wait-timeout",
            envvar="LEADERRUN_WAIT_TIMEOUT",
            help="Give up waiting after this long and exit 75 (implies --wait). "
            "[default: forever]",
            show_default=False,
        ),
    ] = None,
    listen_dsn: Annotated[
        str | None,
        typer.Option(
            "--listen-dsn",
            envvar="LEADERRUN_LISTEN_DSN",
            metavar="DSN",
            help="With --wait: LISTEN for the lock's release on this server "
            "instead of the lease connection; for leases through PgBouncer in "
            "transaction mode, give the server or a session-mode pool. "
            "[default: the lease connection]",
            show_default=False,
        ),
    ] = None,
    busy_exit_code: Annotated[
        int | None,
        typer.Option(
            "--busy-exit-code",
            "-E",
            envvar="LEADERRUN_BUSY_EXIT_CODE",
            help="Exit status when the lock is held elsewhere. [default: 75]",
            show_default=False,
        ),
    ] = None,
    min_hold: Annotated[
        str | None,
        typer.Option(
            "--min-hold",
            envvar="LEADERRUN_MIN_HOLD",
            help="Keep the lock taken until this long after it was acquired (in "
            "database time), even if the command ended sooner, so a late node "
            "skips. [default: 0]",
            show_default=False,
        ),
    ] = None,
    once_per: Annotated[
        str | None,
        typer.Option(
            "--once-per",
            envvar="LEADERRUN_ONCE_PER",
            help="Start at most once per window of database time (1h, 1d); windows "
            "of a day or longer follow --tz's calendar. Later nodes exit 75.",
            show_default=False,
        ),
    ] = None,
    once_per_offset: Annotated[
        str | None,
        typer.Option(
            "--once-per-offset",
            envvar="LEADERRUN_ONCE_PER_OFFSET",
            help="Where --once-per windows start (--once-per 1d --once-per-offset "
            "2h: at 02:00 in --tz). [default: 0]",
            show_default=False,
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule",
            envvar="LEADERRUN_SCHEDULE",
            metavar="'CRON'",
            help="Start at most once per slot of this five-field cron schedule "
            "(the crontab line's own, in --tz); a late, retried or early start "
            "counts for its slot. Later nodes exit 75.",
            show_default=False,
        ),
    ] = None,
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz",
            envvar="LEADERRUN_TZ",
            metavar="ZONE",
            help="The IANA time zone of --schedule and of day-sized --once-per "
            "windows, e.g. Europe/Berlin. [default: UTC]",
            show_default=False,
        ),
    ] = None,
    early_tolerance: Annotated[
        str | None,
        typer.Option(
            "--early-tolerance",
            envvar="LEADERRUN_EARLY_TOLERANCE",
            help="A start this long before a slot (in database time) counts for "
            "it; capped at a quarter of the time since the slot before. "
            "[default: 2m]",
            show_default=False,
        ),
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed/--no-retry-failed",
            envvar="LEADERRUN_RETRY_FAILED",
            help="With --once-per or --schedule, let a slot whose run failed, timed "
            "out, was killed or lost run again.",
        ),
    ] = False,
    splay: Annotated[
        str | None,
        typer.Option(
            "--splay",
            envvar="LEADERRUN_SPLAY",
            help="Sleep a random time below this before trying the lock, so a "
            "fleet's identical crontabs do not all arrive at once. [default: 0]",
            show_default=False,
        ),
    ] = None,
    max_runtime: Annotated[
        str | None,
        typer.Option(
            "--max-runtime",
            envvar="LEADERRUN_MAX_RUNTIME",
            help="Stop the command's group after this long (SIGTERM, --kill-grace, "
            "SIGKILL) and exit 124. [default: none]",
            show_default=False,
        ),
    ] = None,
    history_keep: Annotated[
        int | None,
        typer.Option(
            "--history-keep",
            envvar="LEADERRUN_HISTORY_KEEP",
            help="Runs of this lock kept in the leader_run table. [default: 100]",
            show_default=False,
        ),
    ] = None,
    watchdog: Annotated[
        str,
        typer.Option(
            "--watchdog",
            envvar="LEADERRUN_WATCHDOG",
            metavar="on|off|required",
            help="A watchdog process that stops the command at the deadline if "
            "leaderrun itself is paused (SIGSTOP, swap storm). on: said loudly "
            "if it dies; required: refuse to run without one, and stop the "
            "command if it dies.",
        ),
    ] = "on",
    no_watchdog: Annotated[
        bool,
        typer.Option("--no-watchdog", help="The same as --watchdog off."),
    ] = False,
    ping: Annotated[
        str | None,
        typer.Option(
            "--ping",
            envvar="LEADERRUN_PING_URL",
            metavar="URL",
            help="Ping this monitor (the healthchecks.io protocol) when the command "
            "starts (URL/start) and ends (URL/<exit status>, with the captured "
            "output as the body); only the node that runs the command pings. At "
            "most 2.5s is spent on it after the release; the URL is never shown. "
            "[default: none]",
            show_default=False,
        ),
    ] = None,
    capture_output: Annotated[
        str | None,
        typer.Option(
            "--capture-output",
            envvar="LEADERRUN_CAPTURE_OUTPUT",
            metavar="SIZE",
            help="Relay the command's stdout and stderr through leaderrun and keep "
            "their last SIZE bytes (64k; at most 1m) for the run history and "
            "--ping. [default: off]",
            show_default=False,
        ),
    ] = None,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Take the lock and run COMMAND while holding it; skip if another node has it."""
    secrets = [
        *(() if ping is None else url_secrets(ping)),
        *(() if listen_dsn is None else dsn_secrets(listen_dsn)),
    ]
    env, _ = _start(dsn, verbose, quiet, log_format, secrets, loaded=False)
    # The function's signature is the one list of the options: their values and
    # the variables they came from are read from click's context, by name.
    given = {
        f.name: ctx.params[f.name]
        for f in fields(RawRunOptions)
        if f.name in ctx.params
    }
    if no_watchdog:
        given["watchdog"] = "off"
    options = RawRunOptions(**given, labels=_labels(ctx))
    settings = run_settings(options, tuple(command or ()), env, now_s=time.time())
    # Imported here: psycopg costs ~100 ms, which --help and bad flags need not pay.
    from leaderrun.runner import run_command
    from leaderrun.stores import open_store

    budget_s = settings.timing.attempt_budget_s
    store = open_store(settings.dsn, settings.schema, env, attempt_budget_s=budget_s)
    listen_store = None
    if settings.listen_dsn is not None:
        listen_store = open_store(
            settings.listen_dsn,
            settings.schema,
            env,
            attempt_budget_s=budget_s,
            labels={"dsn": "--listen-dsn"},
        )
    host = os.uname().nodename
    collect_from_here()  # before the run, which may last hours
    raise typer.Exit(run_command(settings, store, env, host, listen_store=listen_store))


def _lock_option(help_text: str) -> Any:
    return typer.Option(
        "--lock-id", envvar="LEADERRUN_LOCK_ID", help=help_text, show_default=False
    )


@app.command("status")
def status(
    lock_id: Annotated[
        str | None,
        _lock_option("Show only this lock; exit 0 if it is held, 3 if it is free."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON document (times in ISO 8601 UTC, durations in seconds); "
            "see leaderrun(1) for its shape.",
        ),
    ] = False,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Show who holds each lock, its fencing token and when its lease ends."""
    from leaderrun import views  # the operators' output: not a run's cost

    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    lock = None if lock_id is None else parse_lock_id(lock_id)
    store = _operator_store(dsn_value, schema, env)
    snapshot = store.snapshot(lock)
    found = views.statuses(snapshot, lock, store.last_runs())
    if as_json:
        typer.echo(json.dumps(views.status_document(found, snapshot.db_now), indent=2))
    elif sys.stdout.isatty():
        _rich_status(found)
    else:
        typer.echo(
            views.plain_table(views.COLUMNS, [views.status_cells(s) for s in found]),
            nl=False,
        )
    raise typer.Exit(views.status_exit_code(found, lock))


_STATE_STYLES = {"held": "bold green", "revoked": "yellow", "expired": "yellow"}


def _rich_status(found: "Sequence[views.LockStatus]") -> None:
    """A table for people: the 64-bit key is left to --json and piped output."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from leaderrun import views

    console = Console()
    if not found:
        console.print("no locks yet", style="dim")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    shown = [i for i, column in enumerate(views.COLUMNS) if column != "KEY"]
    for i in shown:
        column = views.COLUMNS[i]
        # Free text and the date-and-time may wrap (at spaces); short values never.
        wraps = column in (
            "LOCK",
            "HOLDER",
            "COMMAND",
            "ACQUIRED (UTC)",
            "LAST RUN (UTC)",
        )
        table.add_column(column, no_wrap=not wraps)
    for lock_status in found:
        cells = views.status_cells(lock_status)
        state = cells[views.COLUMNS.index("STATE")]
        row = [escape(cells[i]) for i in shown]
        row[shown.index(views.COLUMNS.index("STATE"))] = (
            f"[{_STATE_STYLES.get(state, 'dim')}]{state}[/]"
        )
        table.add_row(*row)
    console.print(table)


@app.command("release")
def release(
    lock_id: Annotated[str | None, _lock_option("The lock to release.")] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Revoke a live lease too: its holder stops the command at its next "
            "renewal and exits 122; others may take the lock once the lease runs out.",
        ),
    ] = False,
    token: Annotated[
        int | None,
        typer.Option(
            "--token",
            help="Only if the lease's fencing token is still this one (as status "
            "showed it); otherwise exit 75 and change nothing.",
            show_default=False,
        ),
    ] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Free a lock whose lease expired; with --force, revoke a live one."""
    from leaderrun import views  # the operators' output: not a run's cost

    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    lock = lock_from(lock_id, env)
    store = _operator_store(dsn_value, schema, env)
    result = store.release(lock, force=force, token=token)
    report = views.release_report(result, lock, token)
    if report.exit_code == 0:
        typer.echo(report.message)
        raise typer.Exit(0)
    _fail(report.message, report.exit_code)


@app.command("init")
def init(
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    print_sql: Annotated[
        bool,
        typer.Option(
            "--print-sql",
            help="Print the SQL instead of running it: the table, and the GRANTs "
            "for a role that may run, show and release but not create.",
        ),
    ] = False,
    role: Annotated[
        str,
        typer.Option(
            "--role",
            envvar="LEADERRUN_ROLE",
            help="The role the printed GRANTs are for (with --print-sql).",
        ),
    ] = "leaderrun",
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Create the leader_lease table if it does not exist (safe to repeat)."""
    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    from leaderrun.stores import open_store, setup_sql, table_label

    if print_sql:
        typer.echo(setup_sql(dsn_value, check_schema(schema), role), nl=False)
        return
    outcome = open_store(dsn_value, check_schema(schema), env).init()
    done = {
        "created": "created",
        "upgraded": "upgraded to this version's format",
        "current": "already exists and is up to date",
    }
    typer.echo(f"{table_label(dsn_value, schema)} {done[outcome]}")


@app.command("history")
def history(
    lock_id: Annotated[
        str | None,
        typer.Option(
            "--lock-id",
            envvar="LEADERRUN_LOCK_ID",
            help="Only this lock's runs. [default: every lock]",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="Show at most this many runs.")
    ] = 20,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="A JSON array: lock, token, holder, host, pid, command, window, "
            "started_at, finished_at (ISO 8601 UTC), duration_s, exit_status, "
            "outcome.",
        ),
    ] = False,
    output: Annotated[
        bool,
        typer.Option(
            "--output",
            help="Print the output --capture-output kept of the lock's newest run "
            "(or of --token N) instead; exit 3 if there is none.",
        ),
    ] = False,
    token: Annotated[
        int | None,
        typer.Option(
            "--token",
            help="With --output: the run with this fencing token. [default: the "
            "newest]",
            show_default=False,
        ),
    ] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Show recent runs, newest first: where, when, how long, and how each ended."""
    from leaderrun import views  # the operators' output: not a run's cost

    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    if limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    if (token is not None or output) and lock_id is None:
        flag = "--output" if output else "--token"
        raise ConfigError(f"{flag} needs --lock-id, e.g. history --lock-id ID {flag}")
    if token is not None and not output:
        raise ConfigError("--token is for --output, e.g. history --output --token 42")
    lock = None if lock_id is None else parse_lock_id(lock_id)
    store = _operator_store(dsn_value, schema, env)
    if output and lock is not None:
        _print_output(store.run_output(lock, token), lock, token)
        return
    runs = store.history(lock, limit)
    if as_json:
        typer.echo(json.dumps(views.history_document(runs), indent=2))
        return
    typer.echo(views.history_table(runs), nl=False)


@app.command("check")
def check(
    lock_id: Annotated[str, _lock_option("The lock to check.")],
    max_age: Annotated[
        str | None,
        typer.Option(
            "--max-age",
            help="Expect a success at most this long ago (WARNING past it, "
            "CRITICAL past it plus --grace). [default: from the lock's recorded "
            "--schedule or --once-per]",
            show_default=False,
        ),
    ] = None,
    grace: Annotated[
        str | None,
        typer.Option(
            "--grace",
            help="With a cadence: how long after its slot a run may take to "
            "start; with --max-age: from WARNING to CRITICAL. [default: 5m]",
            show_default=False,
        ),
    ] = None,
    max_running: Annotated[
        str | None,
        typer.Option(
            "--max-running",
            help="A run going on longer than this is a WARNING. [default: until "
            "its next slot]",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="The verdict and its figures as JSON.")
    ] = False,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Did the job run, and did it succeed? A monitoring plugin: exit 0-3."""
    from leaderrun import checks, views  # the operators' modules: not a run's cost

    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    lock = None
    try:
        lock = parse_lock_id(lock_id)

        def seconds(text: str | None, flag: str) -> float | None:
            return None if text is None else parse_duration(text, option=flag)

        grace_s = seconds(grace, "--grace")
        expect = checks.Expectation(
            max_age_s=seconds(max_age, "--max-age"),
            grace_s=checks.DEFAULT_GRACE_S if grace_s is None else grace_s,
            max_running_s=seconds(max_running, "--max-running"),
        )
        store = _operator_store(dsn_value, schema, env)
        snapshot = store.snapshot(lock)
        (found,) = views.statuses(snapshot, lock)
        result = checks.check(found, store.history(lock, 50), snapshot.db_now, expect)
    except LeaderrunError as exc:
        # A plugin never crashes: what it cannot tell is UNKNOWN, on stdout.
        name = lock_id if lock is None else str(lock)
        line = f"LEADERRUN UNKNOWN - {name}: {exc.message}"
        typer.echo(
            json.dumps(
                {
                    "lock": name,
                    "state": "UNKNOWN",
                    "exit_code": 3,
                    "message": exc.message,
                }
            )
            if as_json
            else line
        )
        raise typer.Exit(int(checks.CheckState.UNKNOWN)) from None
    typer.echo(json.dumps(result.document(), indent=2) if as_json else result.line())
    raise typer.Exit(int(result.state))


@app.command("metrics")
def metrics(
    textfile: Annotated[
        Path | None,
        typer.Option(
            "--textfile",
            help="Write the metrics to this file atomically (node_exporter's "
            "textfile collector reads *.prom) instead of printing them.",
            show_default=False,
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            metavar="HOST:PORT",
            help="Serve /metrics on this address until SIGTERM, reading the "
            "database at each scrape.",
            show_default=False,
        ),
    ] = None,
    dsn: DsnOption = None,
    schema: SchemaOption = DEFAULT_SCHEMA,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Every lock as Prometheus metrics: held, token, last run, runs by outcome."""
    # The Prometheus client and the operators' modules: not a run's cost.
    from leaderrun import metrics as exporter

    env, dsn_value = _start(dsn, verbose, quiet, log_format)
    if textfile is not None and listen is not None:
        raise ConfigError("--textfile and --listen both given; use one")
    address = None if listen is None else exporter.parse_listen(listen)
    store = _operator_store(dsn_value, schema, env)

    def read() -> "tuple[LeaseSnapshot, list[RunRecord]]":
        with contextlib.closing(store.connect()) as session:
            return session.snapshot(None), session.last_runs()

    if address is not None:
        stop = threading.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stop.set())
        exporter.serve(read, *address, stop)
        return
    text = exporter.exposition(read)
    if textfile is None:
        sys.stdout.buffer.write(text)
    else:
        exporter.write_textfile(textfile, text)


def _print_output(found: "RunOutput | None", lock: "LockId", token: int | None) -> None:
    """``history --output``: the kept tail as it was written, or why there is none."""
    which = "newest run" if token is None else f"run with token {token}"
    if found is None:
        _fail(f"{lock} has no {which} in the history", EXIT_STATUS_FREE)
    if found.output is None:
        _fail(
            f"the {which} of {lock} (token {found.token}) kept no output; run the "
            "command with --capture-output SIZE",
            EXIT_STATUS_FREE,
        )
    sys.stdout.write(found.output)


def _route(args: list[str]) -> list[str]:
    """Send the bare form (``leaderrun --lock-id X -- cmd``) to ``run``.

    A bare ``--watchdog`` (before ``--``) means ``--watchdog on``, as it did when
    it was an on/off flag: click has no option that takes a value only sometimes.
    """
    if args and args[0] not in SUBCOMMANDS and args[0] not in _TOP_LEVEL_FLAGS:
        args = ["run", *args]
    end = args.index("--") if "--" in args else len(args)
    options = args[:end]
    for index in reversed(range(len(options))):
        following = options[index + 1] if index + 1 < len(options) else None
        if options[index] == "--watchdog" and (
            following is None or following.startswith("-")
        ):
            options.insert(index + 1, "on")
    return options + args[end:]


def _misplaced_subcommand(
    args: Sequence[str], takes_value: Mapping[str, bool]
) -> str | None:
    """The hint for ``leaderrun --dsn X status``: a subcommand named after options.

    ``args`` is a routed bare form (``run`` first, put there by ``_route``); its
    first argument that is neither an option nor an option's value is the
    command to run. When that names a subcommand, the user almost surely meant
    the subcommand and put it after its options: running a program called
    ``status`` (exit 127), or complaining of a missing ``--lock-id``, would hide
    that. A program really named ``status`` goes after ``--``, never checked
    here. The hint repeats option names only: a value may hold a password.

    Args:
        args: the arguments after ``_route``, starting with ``run``.
        takes_value: every option of ``run`` -> whether it takes a value.
    """
    options: list[str] = []
    index = 1
    while index < len(args) and args[index] != "--":
        arg = args[index]
        if not arg.startswith("-") or arg == "-":
            if arg not in SUBCOMMANDS:
                return None
            shown = " ".join(options)
            return (
                f"subcommands come first: leaderrun {arg} {shown}".rstrip()
                + f"; to run a program named {arg}, put it after --"
            )
        name, has_value, _ = arg.partition("=")
        if takes_value.get(name) and not has_value:
            options.append(f"{name} …")
            index += 1  # its value, whatever it looks like
        else:
            options.append(f"{name}=…" if has_value else name)
        index += 1
    return None


def _options_taking_values(command: Any) -> dict[str, bool]:
    """Each option of click's ``command`` -> whether it takes a value."""
    taking: dict[str, bool] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        takes = not (param.is_flag or param.count)
        for name in (*param.opts, *param.secondary_opts):
            taking[name] = takes
    return taking


def _requested_log_format(args: Sequence[str], env: Mapping[str, str]) -> LogFormat:
    """The --log-format of the command line or environment, before click parses it."""
    value = env.get("LEADERRUN_LOG_FORMAT", "")
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--log-format" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith("--log-format="):
            value = arg.partition("=")[2]
    return LogFormat.json if value == LogFormat.json else LogFormat.text


def _click_command(args: Sequence[str]) -> Any:
    """The click command for ``args``: with only the subcommand they name, if any.

    typer builds every command's options from its signature when asked for the
    group; a run, which pays this on every node every time, needs only its own.
    Help, errors and parsing are the same: click consults only the named
    subcommand once the first argument names one.
    """
    if args[:1] and args[0] in SUBCOMMANDS:
        only = copy.copy(app)
        only.registered_commands = [
            info for info in app.registered_commands if info.name == args[0]
        ]
        return get_command(only)
    return get_command(app)


def _fail(message: str, exit_code: int) -> NoReturn:
    stderr_sink().write(_error_line(message).encode())
    sys.exit(exit_code)


def _print_traceback() -> None:
    """The current exception's traceback (with -v), through the same sink."""
    text = redact(traceback.format_exc(), _State.secrets)
    stderr_sink().write(text.encode("utf-8", "replace"))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``leaderrun`` console script: route, run, map every error to its status."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = _route(given)
    # Errors raised before a command sets up logging (usage errors) still honour
    # the requested format, so a JSON log consumer never sees a bare text line.
    _State.log_format = _requested_log_format(args, os.environ)
    command = _click_command(args)
    if given[:1] != ["run"] and args[:1] == ["run"]:  # the bare form
        run_options = _options_taking_values(command.commands["run"])
        if (hint := _misplaced_subcommand(args, run_options)) is not None:
            _fail(hint, EXIT_USAGE)
    try:
        status = command.main(args, prog_name="leaderrun", standalone_mode=False)
    except BusyError as exc:
        # Skipping is the normal outcome on all nodes but one: stay quiet in
        # cron, unless someone is watching or asked for more.
        if sys.stderr.isatty() or _State.verbose:
            _fail(exc.message, exc.exit_code)
        sys.exit(exc.exit_code)
    except LeaderrunError as exc:
        if _State.verbose:
            _print_traceback()
        _fail(exc.message, exc.exit_code)
    except typer.TyperException as exc:
        # click's usage errors (exit_code 2) become 64, EX_USAGE.
        code = EXIT_USAGE if exc.exit_code == 2 else exc.exit_code
        message = exc.format_message()
        if not message:
            # No arguments at all: click has printed the help, which says it all.
            sys.exit(code)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and message == ctx.get_help():
            # The same, without rich: the help is the error's message.
            typer.echo(message)
            sys.exit(code)
        hint = " (see leaderrun --help)" if code == EXIT_USAGE else ""
        _fail(f"{message}{hint}", code)
    except typer.Abort:
        _fail("aborted", signal_status(signal.SIGINT))
    except KeyboardInterrupt:
        _fail("interrupted", signal_status(signal.SIGINT))
    except Exception as exc:  # the one boundary: no traceback unless -v
        if _State.verbose:
            _print_traceback()
        _fail(f"internal error: {exc!r} (run with -v for details)", EXIT_INTERNAL)
    sys.exit(status if isinstance(status, int) else 0)


__all__ = ["MASK", "app", "main"]
