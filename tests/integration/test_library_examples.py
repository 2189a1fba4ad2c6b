"""The library examples run against the test database and do what they say."""

import subprocess
import sys
from pathlib import Path

import pytest

from leaderrun import LeaderElector

pytestmark = [pytest.mark.pg, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "library"
TIMEOUT_S = 120


def example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_fencing_writes_with_the_token_and_refuses_a_stale_one(
    pg_dsn, pg_admin, lock_name
):
    first = example("fencing.py", "--dsn", pg_dsn, "--lock-id", lock_name)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "wrote with fencing token 1"
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT body, last_token FROM fenced_report WHERE name = %s", (lock_name,)
        ).fetchone()
        assert row == ("hello from the leader", 1)
        # A newer leader (token 1000) wrote meanwhile: our next token, 2, is stale.
        admin.execute(
            "UPDATE fenced_report SET last_token = 1000 WHERE name = %s", (lock_name,)
        )
    second = example("fencing.py", "--dsn", pg_dsn, "--lock-id", lock_name)
    assert second.returncode == 75, second.stdout + second.stderr
    assert "refused: a newer leader wrote (our token 2)" in second.stderr


def test_the_scheduled_job_runs_on_the_leader_and_skips_elsewhere(pg_dsn, lock_name):
    args = ("--dsn", pg_dsn, "--lock-id", lock_name, "--every", "0.2", "--ticks", "3")
    alone = example("scheduled_job.py", *args, "--lease", "6")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.splitlines() == [
        f"tick {n}: sending the report" for n in (1, 2, 3)
    ]
    with LeaderElector(lock_name, dsn=pg_dsn, lease_s=6) as holder:
        assert holder.wait_for_leadership(60)
        follower = example("scheduled_job.py", *args, "--lease", "6")
    assert follower.returncode == 0, follower.stderr
    assert follower.stdout.splitlines() == [
        f"tick {n}: not the leader, skipped" for n in (1, 2, 3)
    ]


def test_the_worker_works_while_leading(pg_dsn, lock_name):
    result = example(
        "worker.py", "--dsn", pg_dsn, "--lock-id", lock_name, "--items", "5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "elected with fencing token 1",
        "lost leadership: stopped",  # stepping down at the end of the with block
        "processed 5 items",
    ]
