"""Every leaderrun line of examples/guards/crontab runs, against the real database."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.pg, pytest.mark.slow]

CRONTAB = Path(__file__).resolve().parents[2] / "examples" / "guards" / "crontab"


def crontab_commands() -> list[list[str]]:
    """The argv of each job line: the command after the five schedule fields."""
    commands = []
    for line in CRONTAB.read_text().splitlines():
        if not line.strip() or line.startswith("#") or "=" in line.split()[0]:
            continue
        commands.append(shlex.split(line)[5:])
    return commands


def test_the_crontab_has_the_guards():
    text = " ".join(" ".join(argv) for argv in crontab_commands())
    for flag in ("--schedule", "--splay", "--retry-failed"):
        assert flag in text
    assert "--min-hold" in text
    assert "--max-runtime" in text
    assert len(crontab_commands()) == 3


def test_a_schedule_is_the_line_s_own_or_a_slot_its_firings_share():
    """The backup's --schedule is its line's; the report's two firings an hour
    share the one slot its --schedule names (the second is the retry)."""
    for line in CRONTAB.read_text().splitlines():
        if "--schedule" not in line:
            continue
        fields, argv = line.split()[:5], shlex.split(line)[5:]
        schedule = argv[argv.index("--schedule") + 1].split()
        assert schedule[1:] == fields[1:]
        assert schedule[0] in fields[0].split(",")


@pytest.mark.parametrize("argv", crontab_commands(), ids=lambda argv: argv[2])
def test_each_crontab_line_runs_once_then_skips(argv, pg_dsn, lock_name):
    """The line as written (its job replaced by `true`, its splay dropped so that
    the test does not sleep): runs, then a twin skips."""
    assert argv[0] == "leaderrun"
    split = argv.index("--")
    options = argv[1:split]
    if "--splay" in options:
        at = options.index("--splay")
        del options[at : at + 2]
    lock_at = options.index("--lock-id") + 1
    options[lock_at] = f"{lock_name}-{options[lock_at]}"
    command = [sys.executable, "-m", "leaderrun", *options, "--dsn", pg_dsn, "--"]
    first = subprocess.run(
        [*command, "true"], capture_output=True, text=True, timeout=60, check=False
    )
    assert first.returncode == 0, first.stderr
    # Every line has --schedule or --min-hold: a late twin skips.
    second = subprocess.run(
        [*command, "true"], capture_output=True, text=True, timeout=60, check=False
    )
    assert second.returncode == 75, second.stderr
