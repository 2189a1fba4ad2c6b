"""``--ping`` and ``--capture-output`` end to end, against a monitor in the test.

The monitor (:mod:`tests.helpers.monitor`) is an HTTP server on 127.0.0.1 that
records every ping, or accepts and never answers. The ping is the same on both
stores, so most tests run on SQLite only.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from leaderrun.capture import RELAY_FLUSH_S
from leaderrun.clock import boottime
from leaderrun.errors import EXIT_BUSY, EXIT_LEASE_LOST, EXIT_TIMEOUT, EXIT_USAGE
from leaderrun.ping import PING_BOUND_S
from tests.acceptance.conftest import FAST, child, read_rest, wait_for_line
from tests.faults.local.host import stalled_pipe
from tests.helpers.monitor import KEY, Monitor, refusing_url

pytestmark = [pytest.mark.slow]

EXIT_SLACK_S = 1.5
"""Beyond a documented bound, what a loaded 2-core host may add to an exit."""

STAMPED_EXIT = (
    "import sys, time; print('bye', flush=True); "
    "open(sys.argv[1], 'w').write(repr(time.clock_gettime(time.CLOCK_BOOTTIME))); "
    "sys.exit(5)"
)
"""A command that prints, stamps the moment it exits on CLOCK_BOOTTIME, exits 5."""


def exit_delay_s(
    leaderrun, tmp_path, *args: str
) -> tuple[float, subprocess.Popen[str]]:
    """How long leaderrun took to exit after its command did."""
    stamp = tmp_path / "exited"
    proc = leaderrun.start(*args, "--", sys.executable, "-c", STAMPED_EXIT, stamp)
    proc.wait(timeout=30)
    exited_s = boottime()
    return exited_s - float(stamp.read_text()), proc


def run_pinged(leaderrun, monitor: Monitor, size: str, *command: str, **kw):
    """Run ``command`` under leaderrun with --ping and --capture-output ``size``."""
    return leaderrun.run(
        "--ping", monitor.url, "--capture-output", size, "--", *command, **kw
    )


def test_the_running_node_pings_start_then_its_status_with_the_output(leaderrun):
    """/start, then /<status> with the same rid and the output's tail as the body."""
    with Monitor() as monitor:
        result = run_pinged(
            leaderrun, monitor, "64k", "sh", "-c", "echo hello; echo oops >&2; exit 3"
        )
    assert result.returncode == 3, result.stderr
    start, end = monitor.pings
    assert (start.method, start.path, start.body) == ("GET", f"/{KEY}/start", b"")
    assert (end.method, end.path) == ("POST", f"/{KEY}/3")
    assert sorted(end.body.splitlines()) == [b"hello", b"oops"]
    assert start.rid is not None
    assert start.rid == end.rid
    assert start.at_s <= end.at_s
    # The output still reached leaderrun's own streams as it came.
    assert (result.stdout, result.stderr) == ("hello\n", "oops\n")


@pytest.mark.stores("sqlite")
def test_without_captured_output_the_end_ping_has_no_body(leaderrun):
    """Without --capture-output the output is untouched and the end ping is a GET."""
    with Monitor() as monitor:
        result = leaderrun.run("--ping", monitor.url, "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, "hi\n")
    assert [(p.method, p.event, p.body) for p in monitor.pings] == [
        ("GET", "start", b""),
        ("GET", "0", b""),
    ]


@pytest.mark.stores("sqlite")
def test_a_node_that_skips_pings_nothing(leaderrun):
    """A node that finds the lock held exits 75 and the monitor hears nothing."""
    holder = leaderrun.start(*FAST, "--", *child())
    wait_for_line(holder.stdout, "ready")
    with Monitor() as monitor:
        skipped = leaderrun.run("--ping", monitor.url, "--", "true")
    assert skipped.returncode == EXIT_BUSY, skipped.stderr
    assert monitor.pings == []


@pytest.mark.stores("sqlite")
@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("--max-runtime", "0.3s", "--", "sleep", "30"), EXIT_TIMEOUT),
        (("--", "sh", "-c", "kill -TERM $$"), 143),
    ],
    ids=["timeout", "signal"],
)
def test_a_failure_of_leaderrun_s_own_is_pinged_as_its_status(leaderrun, args, status):
    """A timeout (124) or a death by signal (128+N) reaches the monitor as itself."""
    with Monitor() as monitor:
        result = leaderrun.run("--ping", monitor.url, *args)
    assert result.returncode == status, result.stderr
    assert [p.event for p in monitor.pings] == ["start", str(status)]


@pytest.mark.stores("sqlite")
def test_a_lost_lease_is_pinged_as_122(leaderrun, lease_admin):
    """A holder whose lease is taken over stops its command and pings /122."""
    with Monitor() as monitor:
        holder = leaderrun.start(*FAST, "--ping", monitor.url, "--", *child())
        wait_for_line(holder.stdout, "ready")
        lease_admin.take_over(leaderrun.lock)
        assert holder.wait(timeout=30) == EXIT_LEASE_LOST
    assert [p.event for p in monitor.pings] == ["start", "122"]


@pytest.mark.timing
@pytest.mark.stores("sqlite")
@pytest.mark.parametrize("fault", ["hangs", "refuses"])
def test_a_monitor_that_hangs_or_refuses_delays_the_exit_at_most_the_bound(
    leaderrun, tmp_path, fault
):
    """The status is the command's, and the exit comes within PING_BOUND_S."""
    if fault == "hangs":
        with Monitor(hang=True) as monitor:
            delay_s, proc = exit_delay_s(
                leaderrun, tmp_path, "-vv", "--ping", monitor.url
            )
    else:
        with refusing_url() as url:
            delay_s, proc = exit_delay_s(leaderrun, tmp_path, "-vv", "--ping", url)
    assert proc.stderr is not None
    stderr = read_rest(proc.stderr)
    assert proc.returncode == 5, stderr
    # Said once, without the key; which ping gave up first depends on the fault.
    assert "did not take the end ping (5)" in stderr, stderr
    assert delay_s < PING_BOUND_S + EXIT_SLACK_S, (
        f"exit {delay_s:.2f}s after the command"
    )
    print(f"ping {fault}: leaderrun exited {delay_s:.2f}s after its command")


@pytest.mark.stores("sqlite")
def test_the_ping_url_s_key_is_never_shown_even_at_debug(leaderrun):
    """At -vv, with the monitor hanging or fine, stderr names its host, not its key."""
    with Monitor(hang=True) as hanging:
        slow = leaderrun.run("-vv", "--ping", hanging.url, "--", "true")
    with Monitor() as monitor:
        fine = leaderrun.run(
            "-vv", "--", "true", env={"LEADERRUN_PING_URL": monitor.url + "?create=1"}
        )
    for result in (slow, fine):
        assert result.returncode == 0, result.stderr
        assert "http://127.0.0.1:" in result.stderr  # the monitor is named...
        assert KEY not in result.stderr  # ...its key never
    assert [p.event for p in monitor.pings] == ["start", "0"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"ftp://hc-ping.com/{KEY}", "must be an http:// or https:// URL"),
        (f"hc-ping.com/{KEY}", "must be an http:// or https:// URL"),
        (f"https://user:{KEY}@hc-ping.com/x", "must not carry a user or password"),
        (f"https://hc-ping.com/{KEY} x", "must be ASCII without spaces"),
    ],
)
def test_a_bad_ping_url_is_one_line_exit_64_without_its_key(value, problem, tmp_path):
    """Checked at start: one line naming what is wrong, exit 64, nothing ran."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "leaderrun", "--dsn", f"sqlite://{tmp_path}/l.db"),
            *("--lock-id", "x", "--ping", value, "--", "touch", tmp_path / "ran"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == EXIT_USAGE
    assert problem in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert KEY not in result.stderr
    assert not (tmp_path / "ran").exists()


# --- --capture-output -----------------------------------------------------------------

ALTERNATE = (
    "import os\nfor i in range(300):\n    os.write(1 + i % 2, b'line %d\\n' % i)\n"
)
"""A command that writes 300 numbered lines, alternately to stdout and stderr."""


@pytest.mark.stores("sqlite")
def test_one_file_for_stdout_and_stderr_keeps_the_command_s_interleaving(leaderrun):
    """With 2>&1, the command's lines arrive in the order it wrote them."""
    with Monitor() as monitor:
        result = run_pinged(
            leaderrun,
            monitor,
            "64k",
            sys.executable,
            "-c",
            ALTERNATE,
            stderr=subprocess.STDOUT,
        )
    expected = "".join(f"line {i}\n" for i in range(300))
    assert (result.returncode, result.stdout) == (0, expected)
    assert monitor.pings[-1].body.decode() == expected  # the tail, in order too


@pytest.mark.stores("sqlite")
def test_two_files_each_get_their_own_stream_in_order(leaderrun):
    """Separate stdout and stderr each get their own lines, in order."""
    result = leaderrun.run(
        "--capture-output", "64k", "--", sys.executable, "-c", ALTERNATE
    )
    assert result.returncode == 0
    assert result.stdout == "".join(f"line {i}\n" for i in range(0, 300, 2))
    assert result.stderr == "".join(f"line {i}\n" for i in range(1, 300, 2))


@pytest.mark.stores("sqlite")
def test_only_the_last_size_bytes_are_kept(leaderrun):
    """--capture-output 1k keeps the last 1024 bytes of a longer output."""
    script = "for i in range(5000): print('%06d' % i)"
    with Monitor() as monitor:
        result = run_pinged(leaderrun, monitor, "1k", sys.executable, "-c", script)
    assert result.returncode == 0
    assert result.stdout.count("\n") == 5000
    assert monitor.pings[-1].body == result.stdout.encode()[-1024:]


@pytest.mark.timing
@pytest.mark.stores("sqlite")
def test_a_stalled_stdout_neither_blocks_the_command_nor_the_exit(leaderrun, tmp_path):
    """With leaderrun's stdout a pipe nobody reads, a command writing 8 MB runs
    through; the overflow is dropped, said once, and the tail is kept."""
    script = (
        "import sys\n"
        "for i in range(8 * 1024):\n"
        "    sys.stdout.write('x' * 1023 + '\\n')\n"
        "print('last')"
    )
    with Monitor() as monitor, stalled_pipe() as stdout:
        started_s = time.monotonic()
        proc = leaderrun.start(
            "--ping",
            monitor.url,
            "--capture-output",
            "4k",
            "--",
            sys.executable,
            "-c",
            script,
            stdout=stdout,
        )
        assert proc.wait(timeout=60) == 0
        took_s = time.monotonic() - started_s
        stderr = read_rest(proc.stderr)
    assert "were not relayed: leaderrun's stdout was not being read" in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert monitor.pings[-1].body.endswith(b"x\nlast\n")
    # The relay waited for the stalled reader RELAY_FLUSH_S at most, not forever.
    assert took_s < 10 + RELAY_FLUSH_S, took_s


@pytest.mark.pg
def test_history_output_prints_the_tail_the_run_kept(leaderrun):
    """The tail is stored with the run: the newest run's, or a token's; a run
    without --capture-output kept none (exit 3, said why)."""
    job = ("sh", "-c", "echo first; sleep 0.2; echo second >&2; exit 2")
    assert leaderrun.run("--capture-output", "1k", "--", *job).returncode == 2
    assert leaderrun.run("--", "true").returncode == 0
    kept = leaderrun.operator("history", "--output", "--token", "1")
    assert (kept.returncode, kept.stdout) == (0, "first\nsecond\n")
    newest = leaderrun.operator("history", "--output")
    assert newest.returncode == 3
    assert newest.stderr == (
        f"leaderrun: the newest run of {leaderrun.lock} (token 2) kept no output; "
        "run the command with --capture-output SIZE\n"
    )
    missing = leaderrun.operator("history", "--output", "--token", "9")
    assert missing.returncode == 3
    assert "has no run with token 9 in the history" in missing.stderr
