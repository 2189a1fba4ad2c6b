"""The operators' commands against a live holder, for any connection and role."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.acceptance.conftest import Leaderrun, readline

HOLDER_READY = "holding"


def leaderrun_command(
    command: str, dsn: str, schema: str, lock: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``leaderrun COMMAND`` on ``lock`` in ``schema`` to completion."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "leaderrun", command),
            *("--dsn", dsn, "--schema", schema, "--lock-id", lock),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status_release_history(runner: Leaderrun, schema: str) -> None:
    """A holder is shown, refused, force-released (it exits 122), then in history.

    ``runner`` starts leaderrun over the connection under test; the operators'
    commands use the same DSN and schema, so the same role and route.
    """
    holder = runner.start("--", "sh", "-c", f"echo {HOLDER_READY}; exec sleep 60")
    assert holder.stdout is not None
    assert readline(holder.stdout).strip() == HOLDER_READY

    def command(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return leaderrun_command(name, runner.dsn, schema, runner.lock, *args)

    shown = command("status", "--json")
    assert shown.returncode == 0, shown.stderr
    (lock,) = json.loads(shown.stdout)["locks"]
    assert (lock["state"], lock["token"], lock["pid"]) == ("held", 1, holder.pid)

    refused = command("release")
    assert refused.returncode == 75, refused.stderr
    forced = command("release", "--force")
    assert forced.returncode == 0, forced.stderr
    assert holder.wait(60) == 122

    history = command("history", "--json")
    assert history.returncode == 0, history.stderr
    runs = json.loads(history.stdout)
    assert [run["token"] for run in runs] == [1]
    assert runs[0]["pid"] == holder.pid
