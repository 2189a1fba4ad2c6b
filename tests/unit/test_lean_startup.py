"""Paths that do not talk to the database import neither psycopg nor rich.

Each case runs the real ``python -m leaderrun`` in a subprocess under
``-X importtime``, which lists every module the process imported, whatever way
it exits (leaderrun leaves with ``os._exit``, so no atexit hook could report).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from leaderrun import cli
from leaderrun.errors import EXIT_UNAVAILABLE, EXIT_USAGE

HEAVY = ("psycopg", "psycopg_binary", "rich", "pydantic")
"""Libraries no database-free path may load (pydantic: typer >= 0.29 pulls it in)."""

NO_DATABASE = "host=127.0.0.1 port=1 dbname=none user=none connect_timeout=2"
"""Nothing listens on port 1: connecting fails at once."""


def imported(*args: str) -> tuple[int, set[str]]:
    """Run leaderrun with ``args``; return its status and every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "leaderrun", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    modules = {
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "leaderrun.cli" in modules, done.stderr  # the probe saw the imports
    return done.returncode, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--help"], 0),
        (["-h"], 0),
        (["--version"], 0),
        (["run", "--help"], 0),
        (["init", "--help"], 0),
        ([], EXIT_USAGE),
        (["--lock-id"], EXIT_USAGE),
        (["--lock-id", "x", "--no-such-flag", "--", "true"], EXIT_USAGE),
        (["--lock-id", "x", "--lease-duration", "soon", "--", "true"], EXIT_USAGE),
        (["--lock-id", "x", "--lease-duration", "1s", "--", "true"], EXIT_USAGE),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_a_path_without_the_database_loads_no_driver_and_no_rich(args, status):
    code, modules = imported(*args)
    assert code == status
    assert heavy(modules) == []


def test_a_path_that_connects_loads_the_driver_but_not_rich():
    """The probe can fail: the one path that needs psycopg shows it, and only it."""
    code, modules = imported("--dsn", NO_DATABASE, "--lock-id", "x", "--", "true")
    assert code == EXIT_UNAVAILABLE
    assert "psycopg" in modules
    assert [m for m in heavy(modules) if not m.startswith("psycopg")] == []


HTTP = ("urllib.request", "http.client", "ssl", "leaderrun.ping", "leaderrun.capture")
"""What only --ping and --capture-output load."""


def test_a_run_without_ping_or_capture_loads_no_http(tmp_path):
    """A plain run, which runs its command, pays nothing for the monitoring options."""
    code, modules = imported(
        "--dsn", f"sqlite://{tmp_path}/l.db", "--lock-id", "x", "--", "true"
    )
    assert code == 0
    assert sorted(m for m in modules if m in HTTP) == []


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_a_subcommand_builds_only_its_own_command(name):
    """typer reads each command's options from its signature: a run (paid on every
    node, every time) builds no other subcommand's."""
    group = cli._click_command([name, "--help"])
    assert sorted(group.commands) == [name]
    assert group.commands[name].params  # its own options are all there


def test_the_top_level_builds_every_subcommand():
    """`leaderrun --help`, a bare form's errors and unknown commands see them all."""
    for args in (["--help"], [], ["no-such-command"]):
        assert sorted(cli._click_command(args).commands) == sorted(cli.SUBCOMMANDS)


def test_commands_turn_the_collector_back_on(tmp_path):
    """`python -m leaderrun` starts with the garbage collector off; a run turns it
    on (what start-up built frozen) before it starts anything that may last, and
    so does every other command."""
    probe = textwrap.dedent(
        """
        import gc, json, sys
        gc.disable()
        from leaderrun import cli, runner
        real, seen = runner.run_command, []
        def spy(*args, **kwargs):
            seen.append([gc.isenabled(), gc.get_freeze_count() > 0])
            return real(*args, **kwargs)
        runner.run_command = spy
        try:
            cli.main(sys.argv[1:])
        except SystemExit as exc:
            print(json.dumps([exc.code, seen, gc.isenabled()]))
        """
    )
    db = f"sqlite://{tmp_path}/l.db"

    def run(*args: str) -> object:
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        return json.loads(done.stdout.splitlines()[-1])  # after status's table

    assert run("--dsn", db, "--lock-id", "x", "--", "true") == [0, [[True, True]], True]
    assert run("status", "--dsn", db) == [0, [], True]
