"""Choosing the store, and what only SQLite has: real processes on real files."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from leaderrun.clock import boottime
from tests.acceptance.conftest import (
    FAST,
    child,
    read_rest,
    readline,
    wait_gone,
)
from tests.helpers.command import run as leaderrun_cli

pytestmark = pytest.mark.slow


def test_no_database_anywhere_is_refused_naming_both_choices(tmp_path):
    """No DSN, no DATABASE_URL, no PG*: exit 64, one line, nothing run."""
    marker = tmp_path / "ran"
    result = leaderrun_cli("--lock-id", "x", "--", "touch", str(marker))
    assert result.returncode == 64
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("leaderrun: no database given")
    assert "--dsn postgresql://" in result.stderr
    assert "--dsn sqlite:///" in result.stderr
    assert not marker.exists()


def test_init_refuses_too_without_a_database():
    """`init` with nothing configured: the same refusal, not a local socket attempt."""
    result = leaderrun_cli("init")
    assert result.returncode == 64
    assert result.stderr.startswith("leaderrun: no database given")


def test_libpq_variables_alone_still_mean_postgresql(tmp_path):
    """PGHOST/PGPORT and no DSN: leaderrun goes to that server (here, nobody: 69)."""
    marker = tmp_path / "ran"
    result = leaderrun_cli(
        "--lock-id",
        "x",
        "--",
        "touch",
        str(marker),
        env={"PGHOST": "127.0.0.1", "PGPORT": "1", "PGCONNECT_TIMEOUT": "2"},
    )
    assert result.returncode == 69
    assert result.stderr.startswith("leaderrun: cannot connect to")
    assert '"127.0.0.1", port 1 failed' in result.stderr
    assert not marker.exists()


def test_database_url_may_name_a_sqlite_file(tmp_path):
    """DATABASE_URL=sqlite:///... picks SQLite like --dsn does."""
    result = leaderrun_cli(
        "--lock-id",
        "x",
        "--",
        "sh",
        "-c",
        "echo $LEADERRUN_FENCING_TOKEN",
        env={"DATABASE_URL": f"sqlite://{tmp_path}/l.db"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


def test_init_creates_the_file_and_is_safe_to_repeat(tmp_path):
    """`leaderrun init --dsn sqlite:///...` makes the file and table; again is fine."""
    dsn = f"sqlite://{tmp_path}/leases.db"
    for outcome in ("created", "already exists and is up to date"):
        result = leaderrun_cli("init", "--dsn", dsn)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"leader_lease in {tmp_path}/leases.db {outcome}\n"
    assert (tmp_path / "leases.db").exists()


@pytest.mark.parametrize(
    ("dsn", "needle"),
    [
        ("sqlite:leases.db", "must give an absolute path"),
        ("sqlite:///no/such/dir/leases.db", "directory '/no/such/dir' does not exist"),
    ],
)
def test_bad_sqlite_dsn_exits_64_in_one_line(tmp_path, dsn, needle):
    """A relative path or a missing directory: a usage error naming the value."""
    result = leaderrun_cli("--dsn", dsn, "--lock-id", "x", "--", "true", cwd=tmp_path)
    assert result.returncode == 64
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "leases.db").exists()


def test_a_sqlite_run_never_loads_psycopg(tmp_path):
    """The embedded store needs no PostgreSQL client: psycopg is never imported."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "leaderrun",
            "--dsn",
            f"sqlite://{tmp_path}/l.db",
            "--lock-id",
            "x",
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    imported = [line for line in result.stderr.splitlines() if "import time:" in line]
    assert any(line.endswith("leaderrun.stores.sqlite") for line in imported)
    assert not [line for line in imported if "psycopg" in line]


@pytest.mark.timing
@pytest.mark.stores("sqlite")
def test_a_write_lock_held_elsewhere_still_gets_the_child_killed_on_time(
    leaderrun, lease_admin
):
    """SQLite's frozen database: another process keeps the write lock.

    Every renewal then waits out its busy budget and fails; the main thread's
    deadline, which never waits on the file, stops the child before the lease
    it last wrote could end, and leaderrun exits 122.
    """
    proc = leaderrun.start(*FAST, "--", *child("--grandchild"))
    pids = [int(readline(proc.stdout).split()[1]) for _ in range(2)]
    blocker = lease_admin.sqlite()
    try:
        # Waits for a renewal in flight to commit, then shuts every writer out.
        blocker.execute("BEGIN EXCLUSIVE")
        frozen_at = time.monotonic()
        (expires_boot_s,) = blocker.execute(
            "SELECT expires_boot_s FROM leader_lease WHERE lock_name = ?",
            (leaderrun.lock,),
        ).fetchone()
        for pid in pids:
            wait_gone(pid, 10)
        killed_after_s = time.monotonic() - frozen_at
        killed_boot_s = boottime()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The last renewal was sent before the lock was taken: its deadline (2.33 s
    # after it) plus the kill grace (0.67 s) and a tick bound the kill.
    assert killed_after_s < 2.33 + 0.67 + 0.5
    assert killed_boot_s < expires_boot_s  # the lease it last wrote, same clock
    assert proc.wait(timeout=30) == 122
    stderr = read_rest(proc.stderr)
    assert "held its write lock" in stderr
    assert "lease on" in stderr
