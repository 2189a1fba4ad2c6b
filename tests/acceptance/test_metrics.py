"""``leaderrun metrics`` against the real stores: exposition, textfile, HTTP.

The format is checked by the Prometheus project's own ``promtool check metrics``
(Debian's package ``prometheus``, which ``.ci/run`` installs).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.acceptance.conftest import Leaderrun, LeaseAdmin, wait_for_line

pytestmark = [pytest.mark.pg, pytest.mark.slow]


def metrics(leaderrun: Leaderrun, *args: str) -> subprocess.CompletedProcess[str]:
    """``leaderrun metrics`` on this test's store (every lock in it)."""
    from tests.helpers.command import run as leaderrun_cli

    return leaderrun_cli("metrics", "--dsn", leaderrun.dsn, *args)


def promtool_check(text: str) -> None:
    """Fail unless promtool finds the exposition well formed (lint included)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("promtool is missing; .ci/run installs package prometheus")
        pytest.skip("promtool is missing (Debian package prometheus)")
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(f"{series} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{wanted}}} in:\n{text}")


def test_counters_survive_pruning_and_promtool_accepts_the_output(
    leaderrun, lease_admin
):
    for command in ("true", "false", "true", "true"):
        leaderrun.run("--history-keep", "2", "--", command)
    result = metrics(leaderrun)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    promtool_check(text)
    lock = leaderrun.lock
    assert sample(text, "leaderrun_runs_total", lock=lock, outcome="ok") == 3
    assert sample(text, "leaderrun_runs_total", lock=lock, outcome="failed") == 1
    assert lease_admin.runs_recorded(lock) == 2  # the history was pruned
    assert sample(text, "leaderrun_lock_fencing_token", lock=lock) == 4
    assert sample(text, "leaderrun_lock_held", lock=lock) == 0
    assert sample(text, "leaderrun_database_up") == 1


def test_lock_names_with_quotes_backslashes_and_newlines_are_escaped(
    leaderrun, lease_admin: LeaseAdmin
):
    """A quote and a backslash come from --lock-id; a newline (which leaderrun
    refuses in a name) from a row written by hand."""
    odd = 'we"ird\\name'
    proc = subprocess.run(
        leaderrun.argv("--", "true", lock=odd), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lease_admin.insert_free(f"{leaderrun.lock}\nsecond line")
    text = metrics(leaderrun).stdout
    assert 'leaderrun_lock_held{lock="we\\"ird\\\\name"} 0.0' in text
    assert f'leaderrun_lock_held{{lock="{leaderrun.lock}\\nsecond line"}} 0.0' in text
    promtool_check(text)


def test_textfile_is_written_whole_or_not_at_all(leaderrun, tmp_path):
    assert leaderrun.run("--", "true").returncode == 0
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    path = textfiles / "leaderrun.prom"
    assert metrics(leaderrun, "--textfile", str(path)).returncode == 0
    written = path.read_text()
    assert f'leaderrun_lock_held{{lock="{leaderrun.lock}"}}' in written
    assert [p.name for p in textfiles.iterdir()] == ["leaderrun.prom"]
    # The database gone: an error, and the last good file stays as it was.
    gone = metrics_argv("host=127.0.0.1 port=1 connect_timeout=2")
    down = subprocess.run(
        [*gone, "--textfile", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 69
    assert down.stderr.startswith("leaderrun: cannot connect")
    assert path.read_text() == written
    assert [p.name for p in textfiles.iterdir()] == ["leaderrun.prom"]
    missing = metrics(leaderrun, "--textfile", str(tmp_path / "no" / "x.prom"))
    assert missing.returncode == 64
    assert "give a path in a writable directory" in missing.stderr


def metrics_argv(dsn: str) -> list[str]:
    return [sys.executable, "-m", "leaderrun", "metrics", "--dsn", dsn]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_listen_serves_each_scrape_from_the_database(leaderrun):
    port = free_port()
    server = subprocess.Popen(
        [*metrics_argv(leaderrun.dsn), "--listen", f"127.0.0.1:{port}", "-v"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_line(server.stderr, "serving metrics on")
        url = f"http://127.0.0.1:{port}/metrics"
        first = urllib.request.urlopen(url, timeout=10).read().decode()
        assert f'leaderrun_lock_held{{lock="{leaderrun.lock}"}}' not in first
        assert leaderrun.run("--", "true").returncode == 0
        second = urllib.request.urlopen(url, timeout=10).read().decode()
        assert (
            sample(second, "leaderrun_runs_total", lock=leaderrun.lock, outcome="ok")
            == 1
        )
        promtool_check(second)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--listen", "9464"), "--listen '9464' is not HOST:PORT"),
        (("--listen", "127.0.0.1:0x"), "is not HOST:PORT"),
        (("--listen", ":1", "--textfile", "x.prom"), "both given; use one"),
    ],
)
def test_bad_metrics_options_are_one_line_and_exit_64(leaderrun, args, message):
    result = metrics(leaderrun, *args)
    assert result.returncode == 64
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "monitoring"


def test_the_monitoring_examples_run(leaderrun, tmp_path):
    """examples/monitoring: the crontab's metrics line writes its textfile, and
    the Nagios command checks a lock, each as written but for paths and DSN."""
    assert leaderrun.run("--schedule", "*/1 * * * *", "--", "true").returncode == 0
    [line] = [
        line
        for line in (EXAMPLES / "crontab").read_text().splitlines()
        if "leaderrun metrics" in line
    ]
    argv = shlex.split(line)[5:]
    at = argv.index("--textfile") + 1
    argv[at] = str(tmp_path / Path(argv[at]).name)
    ran = subprocess.run(
        [sys.executable, "-m", "leaderrun", *argv[1:], "--dsn", leaderrun.dsn],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "leaderrun_runs_total" in Path(argv[at]).read_text()

    config = (EXAMPLES / "nagios.cfg").read_text()
    command = config.split("command_line")[1].splitlines()[0].strip()
    command = command.replace("$USER10$", leaderrun.dsn).replace(
        "$ARG1$", leaderrun.lock
    )
    argv = shlex.split(command)
    assert argv[0].endswith("/leaderrun")
    checked = subprocess.run(
        [sys.executable, "-m", "leaderrun", *argv[1:]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.startswith(f"LEADERRUN OK - {leaderrun.lock}: the slot of ")
