"""Paths that do not talk to the database import neither psycopg nor rich.

Each case runs the real ``python -m leaderrun`` in a subprocess under
``-X importtime``, which lists every module the process imported, whatever way
it exits (leaderrun leaves with ``os._exit``, so no atexit hook could report).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

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
