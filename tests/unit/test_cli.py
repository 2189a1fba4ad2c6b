"""The command line in-process: routing, help, usage errors, JSON errors, secrets.

``main()`` always ends in SystemExit; its output is read with capfd: leaderrun's
own messages go to file descriptor 2 through its log sink, not through sys.stderr.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator

import pytest

from leaderrun import __version__, cli
from leaderrun.errors import EXIT_UNAVAILABLE, EXIT_USAGE
from leaderrun.logsink import stderr_sink

NO_COMMAND = (
    "no command given; put it after --, e.g. "
    "leaderrun --lock-id nightly-backup -- ./backup.sh"
)
SECRET = "Hunter2-s3cret"


@pytest.fixture(autouse=True)
def _one_invocation_per_test(monkeypatch) -> Iterator[None]:
    """Undo what one main() leaves behind, as if each test were its own process.

    main() is made for a process of its own: it binds the leaderrun logger to
    its stderr sink (fd 2, which capfd redirects for the test)
    and keeps the verbosity, log format and secrets it saw in cli._State.
    """
    logger = logging.getLogger("leaderrun")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    for name in ("verbose", "log_format", "secrets"):
        monkeypatch.setattr(cli._State, name, getattr(cli._State, name))
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def run_main(capfd, *argv: str) -> tuple[int, str, str]:
    """Run main(argv); return its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    assert stderr_sink().flush(5.0)
    out, err = capfd.readouterr()
    code = exited.value.code
    assert isinstance(code, int), code
    return code, out, err


def only_line(err: str) -> str:
    """The one line of ``err``, which must hold exactly one."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback TCP port that refuses connections: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- routing, help, version -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [("--lock-id", "x"), ("run", "--lock-id", "x")],
    ids=["bare", "run"],
)
def test_bare_form_and_run_are_the_same_command(capfd, argv):
    """`leaderrun --lock-id x` and `leaderrun run --lock-id x` both reach run."""
    code, out, err = run_main(capfd, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert only_line(err) == f"leaderrun: {NO_COMMAND}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_lists_the_subcommands(capfd, flag):
    """Top-level help succeeds and names run and init."""
    code, out, err = run_main(capfd, flag)
    assert (code, err) == (0, "")
    commands = out.split("Commands", 1)[1]
    assert re.search(r"\brun\b", commands), out
    assert re.search(r"\binit\b", commands), out


def test_run_help_lists_the_lock_option(capfd):
    """`leaderrun run --help` succeeds and documents --lock-id."""
    code, out, _ = run_main(capfd, "run", "--help")
    assert code == 0
    assert "--lock-id" in out


def test_version_prints_name_and_version(capfd):
    """`leaderrun --version` prints `leaderrun 0.1.0` and exits 0."""
    code, out, err = run_main(capfd, "--version")
    assert (code, out, err) == (0, f"leaderrun {__version__}\n", "")
    assert __version__ == "0.1.0"


# --- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--bogus",), "--bogus"),
        (("run", "--lock-id", "x", "--bogus"), "--bogus"),
        (("init", "--bogus"), "--bogus"),
        (("--lock-id", "x", "--lease-duration"), "--lease-duration"),
        (
            ("--lock-id", "x", "--busy-exit-code", "many", "--", "true"),
            "--busy-exit-code",
        ),
        (("--lock-id", "x", "--log-format", "yaml", "--", "true"), "yaml"),
    ],
    ids=[
        "unknown-bare",
        "unknown-run",
        "unknown-init",
        "missing-value",
        "not-an-int",
        "bad-choice",
    ],
)
def test_usage_errors_exit_64_with_one_line(capfd, argv, needle):
    """A parsing error exits 64 (not click's 2) with one `leaderrun:` line naming it."""
    code, out, err = run_main(capfd, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    line = only_line(err)
    assert line.startswith("leaderrun: ")
    assert needle in line
    assert "Traceback" not in err


def test_no_arguments_print_the_help_and_nothing_else(capfd):
    """Bare `leaderrun` shows the help and exits 64 without an empty error line."""
    code, out, err = run_main(capfd)
    assert (code, err) == (EXIT_USAGE, "")
    assert "Usage: leaderrun" in out


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (("--dsn", "X", "status"), "leaderrun status --dsn …"),
        (
            ("--dsn", "postgresql://u:s3cret@db/app", "status", "--lock-id", "Y"),
            "leaderrun status --dsn …",
        ),
        (("--dsn=X", "-v", "history", "--json"), "leaderrun history --dsn=… -v"),
        (("--lock-id", "7", "--no-watchdog", "release"), "leaderrun release "
         "--lock-id … --no-watchdog"),
    ],
    ids=["status", "secret-not-repeated", "flag=value", "flags"],
)  # fmt: skip
def test_a_subcommand_after_options_gets_the_hint(capfd, argv, hint):
    """`leaderrun --dsn X status` says subcommands come first and exits 64."""
    code, out, err = run_main(capfd, *argv)
    name = hint.split()[1]
    assert (code, out) == (EXIT_USAGE, "")
    assert err == (
        f"leaderrun: subcommands come first: {hint}; "
        f"to run a program named {name}, put it after --\n"
    )
    assert "s3cret" not in err


def test_a_program_named_like_a_subcommand_runs_after_the_separator(capfd):
    """After `--`, `status` is the command: the usual check for a lock id applies."""
    code, _, err = run_main(capfd, "--dsn", "X", "--", "status")
    assert code == EXIT_USAGE
    assert "no --lock-id given" in err
    assert "subcommands come first" not in err


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (("--log-format", "json", "--bogus"), {}),
        (("--log-format=json", "--bogus"), {}),
        (("--bogus",), {"LEADERRUN_LOG_FORMAT": "json"}),
    ],
    ids=["flag", "flag=value", "environment"],
)
def test_usage_errors_are_json_when_json_was_asked_for(capfd, monkeypatch, argv, env):
    """A usage error, raised before logging is set up, is still one JSON object."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run_main(capfd, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    entry = json.loads(only_line(err))
    assert entry["level"] == "error"
    assert "--bogus" in entry["message"]


def test_bad_duration_flag_is_named(capfd):
    """A bad --lease-duration is reported under the flag's name, with the value."""
    code, _, err = run_main(
        capfd, "--lock-id", "x", "--lease-duration", "soon", "--", "true"
    )
    assert code == EXIT_USAGE
    assert only_line(err) == (
        "leaderrun: --lease-duration 'soon' is not a duration; "
        "use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


@pytest.mark.parametrize(
    "variable",
    [
        "LEADERRUN_LEASE_DURATION",
        "LEADERRUN_RENEW_INTERVAL",
        "LEADERRUN_JITTER",
        "LEADERRUN_KILL_GRACE",
        "LEADERRUN_WAIT_TIMEOUT",
    ],
)
def test_bad_duration_from_the_environment_names_the_variable(
    capfd, monkeypatch, variable
):
    """A bad duration set by an environment twin is reported under that variable."""
    monkeypatch.setenv(variable, "soon")
    code, _, err = run_main(capfd, "--lock-id", "x", "--", "true")
    assert code == EXIT_USAGE
    assert only_line(err) == (
        f"leaderrun: {variable} 'soon' is not a duration; "
        "use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LEADERRUN_BUSY_EXIT_CODE", "300", "LEADERRUN_BUSY_EXIT_CODE 300 must be"),
        ("LEADERRUN_WATCHDOG", "maybe", "LEADERRUN_WATCHDOG 'maybe' must be on,"),
        ("LEADERRUN_ONCE_PER", "soon", "LEADERRUN_ONCE_PER 'soon' is not a"),
        ("LEADERRUN_HISTORY_KEEP", "0", "LEADERRUN_HISTORY_KEEP 0 must be"),
    ],
)
def test_every_bad_value_from_the_environment_names_its_variable(
    capfd, monkeypatch, variable, value, message
):
    """Whatever the option, a bad value from its twin is named as the variable:
    the labels come from the command's own list of options, not a copy of it."""
    monkeypatch.setenv(variable, value)
    code, _, err = run_main(capfd, "--lock-id", "x", "--", "true")
    assert code == EXIT_USAGE
    assert only_line(err).startswith(f"leaderrun: {message}"), err


# --- JSON output --------------------------------------------------------------------


def test_json_error_is_one_object(capfd):
    """With --log-format json the error is a single JSON object on one line, of
    the same shape as every other log line (time, level, event, message, pid)."""
    code, _, err = run_main(capfd, "--log-format", "json", "--lock-id", "x")
    assert code == EXIT_USAGE
    entry = json.loads(only_line(err))
    assert set(entry) == {"time", "level", "event", "message", "pid"}
    assert (entry["level"], entry["event"], entry["message"]) == (
        "error",
        "error",
        NO_COMMAND,
    )


def test_json_from_the_environment_applies_to_errors(capfd, monkeypatch):
    """LEADERRUN_LOG_FORMAT=json turns a configuration error into one JSON object."""
    monkeypatch.setenv("LEADERRUN_LOG_FORMAT", "json")
    monkeypatch.setenv("LEADERRUN_LEASE_DURATION", "soon")
    code, _, err = run_main(capfd, "--lock-id", "x", "--", "true")
    assert code == EXIT_USAGE
    entry = json.loads(only_line(err))
    assert entry["message"].startswith("LEADERRUN_LEASE_DURATION 'soon'")


# --- secrets ------------------------------------------------------------------------


def _dsns(port: int) -> list[str]:
    return [
        f"host=127.0.0.1 port={port} user=app password={SECRET} dbname=prod",
        f"postgresql://app:{SECRET}@127.0.0.1:{port}/prod",
        f"postgresql://app@127.0.0.1:{port}/prod?password={SECRET}",
    ]


@pytest.mark.parametrize("form", [0, 1, 2], ids=["keyword", "uri", "uri-query"])
@pytest.mark.parametrize(
    "options", [(), ("-v",), ("-vv",), ("--log-format", "json", "-v")]
)
def test_password_never_appears_when_the_database_is_unreachable(
    capfd, refused_port, form, options
):
    """An unreachable DSN exits 69 naming user@host:port/db, never its password."""
    dsn = _dsns(refused_port)[form]
    code, out, err = run_main(
        capfd, *options, "--dsn", dsn, "--lock-id", "x", "--", "true"
    )
    assert code == EXIT_UNAVAILABLE
    assert f"cannot connect to app@127.0.0.1:{refused_port}/prod" in err
    assert SECRET not in out + err
    if "-v" in options:
        assert "Traceback" in err, "-v shows the traceback, and it is clean too"


def test_password_echoed_by_the_dsn_parser_is_masked(capfd):
    """A malformed URI whose error quotes the password shows the mask instead."""
    bad = "Hunt%zz-s3cret"
    code, out, err = run_main(
        capfd,
        "-v",
        "--dsn",
        f"postgresql://app:{bad}@127.0.0.1:5432/prod",
        "--lock-id",
        "x",
        "--",
        "true",
    )
    assert code == EXIT_USAGE
    assert bad not in out + err
    assert f'invalid percent-encoded token: "{cli.MASK}"' in err
