"""``release --force`` against a running leaderrun: real processes, on each store."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import pytest

from tests.acceptance.conftest import FAST, child, read_rest, readline
from tests.helpers.command import run as leaderrun_cli
from tests.helpers.processes import pid_gone

pytestmark = [pytest.mark.slow]


def operator(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return leaderrun_cli(*args, "--dsn", dsn)


@pytest.mark.timing
def test_forced_release_stops_the_holder_with_122_and_hands_over_safely(
    leaderrun, lease_admin, tmp_path
):
    """A running leaderrun, `release --force`: its child (and grandchild) stopped,
    exit 122; a waiter runs only after the revoked lease ran out, with token + 1,
    and the two children never overlap."""
    events = tmp_path / "events"
    holder = leaderrun.start(
        *FAST, "--", *child("--grandchild", "--events", str(events))
    )
    pids = [int(readline(holder.stdout).split()[1]) for _ in range(2)]
    waiter = leaderrun.start(
        *FAST, "--wait", "--", *child("--events", str(events), "--exit-after", "0.2")
    )

    status = operator(leaderrun.dsn, "status", "--lock-id", leaderrun.lock)
    assert status.returncode == 0
    assert " held " in status.stdout

    refused = operator(leaderrun.dsn, "release", "--lock-id", leaderrun.lock)
    assert refused.returncode == 75
    assert holder.poll() is None  # without --force nothing happens to it

    forced = operator(leaderrun.dsn, "release", "--lock-id", leaderrun.lock, "--force")
    assert forced.returncode == 0, forced.stderr
    expires_at = lease_admin.expires_at(leaderrun.lock)

    assert holder.wait(timeout=15) == 122
    stopped_at = datetime.now(UTC)
    assert all(pid_gone(pid) for pid in pids)
    assert stopped_at < expires_at  # the revoked lease had not run out yet
    assert "lease on" in read_rest(holder.stderr)

    assert waiter.wait(timeout=30) == 0
    lines = [line.split() for line in events.read_text().splitlines()]
    starts = {int(token): float(at) for what, token, _, at in lines if what == "start"}
    stops = [
        float(at) for what, token, _, at in lines if what == "stop" and token == "1"
    ]
    assert sorted(starts) == [1, 2]
    assert len(stops) == 1  # the child saw SIGTERM (the grandchild logs no events)
    assert max(stops) < starts[2]  # never two at once

    assert lease_admin.row(leaderrun.lock)[1] == 2
