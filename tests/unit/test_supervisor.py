"""The supervisor without a database: real children, real signals, a fake lease.

Children are ``sys.executable`` programs, mostly the handshake child of
tests/helpers/child.py (``ready <pid>``, then ``<SIGNAME> <pid>`` per signal).
Their stdout is a pipe the test reads with a timeout, never a sleep.

Supervisor scenarios whose processes leave orphans run in a fresh interpreter
that calls ``become_subreaper()`` first, as leaderrun does (see ``run_scenario``):
a subreaper adopts every orphan below it for the rest of its life, and the
pytest process must never become one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from leaderrun.clock import boottime
from leaderrun.errors import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    CommandNotExecutableError,
    CommandNotFoundError,
)
from leaderrun.supervisor import (
    FORWARDED_SIGNALS,
    STANDBY_NAME,
    Child,
    Outcome,
    SignalInbox,
    Standby,
    Supervisor,
    exit_status,
    resolve_command,
)
from tests.helpers.processes import pid_gone
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHILD = str(ROOT / "tests" / "helpers" / "child.py")
READ_TIMEOUT_S = 20.0
"""The bound on any wait for a child; generous, the machine may be loaded."""
GRACE_S = 0.5
"""The kill grace of these tests: SIGTERM, then SIGKILL this much later."""
DEADLINE_REASON = "no renewal succeeded before the kill deadline"

# The command exits 5 once the program it started in the background (with
# --events FILE) is ready, leaving that program running; with "setsid" it is
# started in a session of its own, as a daemon does.
LEAVE_BEHIND = """
import os, sys, time
events, how, *argv = sys.argv[1:]
os.posix_spawn(
    sys.executable, [sys.executable, *argv, "--events", events], os.environ,
    setsid=how == "setsid",
)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if os.path.exists(events) and "start" in open(events).read():
        sys.exit(5)
    time.sleep(0.01)
sys.exit(99)
"""

# Forks a process that outlives its parent by a moment: it exits as soon as its
# parent (the command) has exited, which it learns from EOF on a pipe.
ORPHAN = """
import os
read_fd, write_fd = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(write_fd)
    os.read(read_fd, 1)
    os._exit(0)
print(pid, flush=True)
os._exit(7)
"""

# Forks a Standby, tells its pid, and waits to be killed (it never sends the word).
STANDBY_MIDDLE = """
import os, sys
from leaderrun.supervisor import Standby
standby = Standby("/bin/true", ["true"])
print(standby.pid, flush=True)
sys.stdin.read()
"""

# Starts a long-running child with Child, tells its pid, and waits to be killed.
MIDDLE = """
import os, sys
from leaderrun.supervisor import Child
leaf = Child([sys.executable, "-c", "import time; time.sleep(600)"], os.environ)
print(leaf.pid, flush=True)
sys.stdin.read()
"""


def handshake_child(*args: str) -> list[str]:
    """The argv of the handshake child."""
    return [sys.executable, CHILD, *args]


def readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout_s``."""
    return bool(select.select([fd], [], [], timeout_s)[0])


T = TypeVar("T")


class Lines:
    """A pipe that the processes a test starts use as stdout, read line by line."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        self._buffer = b""

    def spawn(self, start: Callable[[], T]) -> T:
        """Call ``start`` with our pipe as fd 1, so what it starts writes to us.

        Our copy of the write end is closed afterwards: EOF then means that
        every process holding the pipe has exited.
        """
        saved = os.dup(1)
        os.dup2(self._write_fd, 1)
        try:
            return start()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(self._write_fd)

    def readline(self, timeout_s: float = READ_TIMEOUT_S) -> str:
        """The next line without its newline; "" at EOF; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            if not readable(self.read_fd, max(0.0, deadline - time.monotonic())):
                pytest.fail(f"no line within {timeout_s}s; got {self._buffer!r}")
            chunk = os.read(self.read_fd, 4096)
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest.decode()
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def ready_pids(self, count: int) -> set[int]:
        """Read ``count`` ``ready <pid>`` lines; return the pids."""
        pids = set()
        for _ in range(count):
            word, pid = self.readline().split()
            assert word == "ready"
            pids.add(int(pid))
        return pids

    def rest(self) -> list[str]:
        """Every line up to EOF, which comes once every writer has exited."""
        lines = []
        while line := self.readline():
            lines.append(line)
        return lines

    def close(self) -> None:
        """Close the read end."""
        os.close(self.read_fd)


class RecordingChild(Child):
    """A Child that logs, in order, every real signal the supervisor sends."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], events: list[str]
    ) -> None:
        super().__init__(argv, env)
        self.watch()
        self.events = events

    def signal_group(self, signum: int) -> bool:
        if signum != 0:  # 0 only asks whether the group is empty
            self.events.append(f"group {signal.Signals(signum).name}")
        return super().signal_group(signum)

    def signal_adopted(self, signum: int) -> int:
        count = super().signal_adopted(signum)
        if count:
            self.events.append(f"adopted {signal.Signals(signum).name} x{count}")
        return count


class FakeWatch:
    """A LeaseWatch whose deadline and loss the test sets; freeze() is logged."""

    def __init__(self, events: list[str], deadline_s: float = math.inf) -> None:
        self.events = events
        self.deadline_s = deadline_s
        self.lost: str | None = None
        self.frozen_at_s: float | None = None
        self._read_fd, self._write_fd = os.pipe()

    def snapshot(self) -> tuple[float, str | None]:
        return self.deadline_s, self.lost

    def freeze(self) -> None:
        self.frozen_at_s = boottime()
        self.events.append("freeze")

    def fileno(self) -> int:
        return self._read_fd

    def lose(self, reason: str) -> None:
        """Report the lease lost, and wake the supervisor as LeaseState does."""
        self.lost = reason
        os.write(self._write_fd, b"!")

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class Setup:
    """One command under supervision: its output, its signal log and its lease."""

    def __init__(self, argv: Sequence[str], grace_s: float = GRACE_S) -> None:
        self.events: list[str] = []
        self.lines = Lines()
        self.child = self.lines.spawn(
            lambda: RecordingChild(argv, os.environ, self.events)
        )
        self.watch = FakeWatch(self.events)
        self.grace_s = grace_s

    def supervisor(self, inbox: SignalInbox) -> Supervisor:
        return Supervisor(self.child, inbox, self.watch, self.grace_s)

    def run(self) -> Outcome:
        """Supervise until the command is over and its group is gone."""
        with SignalInbox() as inbox:
            return self.supervisor(inbox).run()

    def sent(self) -> list[str]:
        """The events, each repeated kill of a loop logged once."""
        return [e for i, e in enumerate(self.events) if e not in self.events[:i]]

    def cleanup(self) -> None:
        """SIGKILL whatever is left of the group, reap, and close everything."""
        if self.child.returncode is None:
            self.child.signal_group(signal.SIGKILL)
            readable(self.child.pidfd, READ_TIMEOUT_S)
            self.child.reap()
        self.child.close()
        self.watch.close()
        self.lines.close()


@pytest.fixture
def setups() -> Iterator[Callable[..., Setup]]:
    """Makes Setups, and cleans every one up after the test."""
    made: list[Setup] = []

    def make(*argv: str, grace_s: float = GRACE_S) -> Setup:
        setup = Setup(argv, grace_s)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.cleanup()


@pytest.fixture
def handlers_kept() -> Iterator[None]:
    """Put back the handlers of the forwarded signals, whatever the test did."""
    saved = {signum: signal.getsignal(signum) for signum in FORWARDED_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signal_self(signum: int) -> None:
    """Send ``signum`` to this process; its Python handler has run on return."""
    os.kill(os.getpid(), signum)


# --- exit_status, resolve_command ---------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "status"),
    [(0, 0), (3, 3), (255, 255), (-signal.SIGTERM, 143), (-signal.SIGKILL, 137)],
)
def test_exit_status_is_the_code_or_128_plus_the_signal(returncode, status):
    """A child's status maps as a shell's: the exit code, or 128+N for signal N."""
    assert exit_status(returncode) == status


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A directory with an executable ``tool``, a non-executable ``data``, a dir."""
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    data = tmp_path / "data"
    data.write_text("#!/bin/sh\nexit 0\n")
    data.chmod(0o644)
    (tmp_path / "subdir").mkdir()
    return tmp_path


def test_resolve_command_finds_a_name_on_path(bin_dir):
    """A bare name is looked up on the PATH of the child's environment."""
    assert resolve_command(["tool", "-x"], {"PATH": f"/nonexistent:{bin_dir}"}) == str(
        bin_dir / "tool"
    )


def test_resolve_command_keeps_a_path(bin_dir):
    """A name with a slash is used as it is, once it is known to be executable."""
    assert resolve_command([str(bin_dir / "tool")], {"PATH": ""}) == str(
        bin_dir / "tool"
    )


@pytest.mark.parametrize(
    ("name", "error", "code", "message"),
    [
        ("tool-nowhere", CommandNotFoundError, EXIT_NOT_FOUND, "command not found"),
        ("data", CommandNotFoundError, EXIT_NOT_FOUND, "command not found"),
        ("{bin}/missing", CommandNotFoundError, EXIT_NOT_FOUND, "no such file"),
        ("{bin}/subdir", CommandNotExecutableError, EXIT_NOT_EXECUTABLE, "not exe"),
        ("{bin}/data", CommandNotExecutableError, EXIT_NOT_EXECUTABLE, "not exe"),
    ],
    ids=["not-on-path", "not-executable-on-path", "no-such-file", "dir", "no-x-bit"],
)
def test_resolve_command_refuses_what_cannot_run(bin_dir, name, error, code, message):
    """Missing commands are 127, directories and non-executables 126, with the name."""
    name = name.format(bin=bin_dir)
    with pytest.raises(error) as raised:
        resolve_command([name], {"PATH": str(bin_dir)})
    assert raised.value.exit_code == code
    assert raised.value.message.startswith(message)
    assert repr(name) in raised.value.message


# --- SignalInbox ----------------------------------------------------------------------


def current_wakeup_fd() -> int:
    """The wakeup fd now set, read without changing it."""
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


@pytest.mark.usefixtures("handlers_kept")
def test_inbox_records_signals_in_order():
    """Signals sent to this process are recorded, oldest first, and taken once."""
    with SignalInbox() as inbox:
        signal_self(signal.SIGUSR1)
        signal_self(signal.SIGHUP)
        signal_self(signal.SIGWINCH)
        assert inbox.take() == [signal.SIGUSR1, signal.SIGHUP, signal.SIGWINCH]
        assert inbox.take() == []


@pytest.mark.usefixtures("handlers_kept")
@pytest.mark.timing
def test_inbox_wait_wakes_on_a_signal_from_another_thread():
    """wait() returns the signal sent while it waits, long before its timeout."""
    with SignalInbox() as inbox:
        sender = threading.Thread(target=signal_self, args=(signal.SIGUSR2,))
        started_s = time.monotonic()
        sender.start()
        assert inbox.wait(READ_TIMEOUT_S * 3) == [signal.SIGUSR2]
        assert time.monotonic() - started_s < READ_TIMEOUT_S
        sender.join()


@pytest.mark.usefixtures("handlers_kept")
def test_inbox_wait_without_a_signal_returns_nothing():
    """wait() with nothing received returns an empty list after its timeout."""
    with SignalInbox() as inbox:
        assert inbox.wait(0.01) == []


@pytest.mark.usefixtures("handlers_kept")
def test_inbox_restores_the_previous_handlers_on_exit():
    """Leaving the inbox restores each handler and the wakeup fd; its pipe is closed."""
    received: list[int] = []

    def earlier(signum: int, frame: object) -> None:
        received.append(signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, earlier)
    wakeup_fd = current_wakeup_fd()
    with SignalInbox() as inbox:
        assert signal.getsignal(signal.SIGUSR1) is not earlier
        assert current_wakeup_fd() not in (-1, wakeup_fd)
        signal_self(signal.SIGUSR1)
    assert {signal.getsignal(s) for s in FORWARDED_SIGNALS} == {earlier}
    assert current_wakeup_fd() == wakeup_fd
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(inbox.fileno())
    assert received == []
    signal_self(signal.SIGUSR1)
    assert received == [signal.SIGUSR1]


# --- Child ---------------------------------------------------------------------


def test_child_leads_its_own_session_and_process_group(setups):
    """The command is the leader of a new session, so of its own process group."""
    setup = setups(*handshake_child())
    (pid,) = setup.lines.ready_pids(1)
    assert pid == setup.child.pid == setup.child.pgid
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) != os.getsid(0)


def test_reap_returns_none_while_running_then_the_status(setups):
    """reap() is None while the command runs, then its status; the group is empty."""
    setup = setups(*handshake_child())
    setup.lines.ready_pids(1)
    assert setup.child.reap() is None
    assert setup.child.group_alive()
    assert setup.child.signal_group(signal.SIGTERM)
    assert readable(setup.child.pidfd, READ_TIMEOUT_S)
    assert setup.child.reap() == -signal.SIGTERM
    assert not setup.child.group_alive()
    assert not setup.child.signal_group(signal.SIGTERM)


def test_reap_returns_the_exit_code(setups):
    """A command that exits by itself is reaped with its exit code."""
    setup = setups(sys.executable, "-c", "raise SystemExit(3)")
    assert readable(setup.child.pidfd, READ_TIMEOUT_S)
    assert setup.child.reap() == 3
    assert setup.child.gone()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("missing", CommandNotFoundError),
        ("subdir", CommandNotExecutableError),
        ("data", CommandNotExecutableError),
    ],
    ids=["missing", "directory", "no-x-bit"],
)
def test_child_that_cannot_exec_raises(bin_dir, name, error):
    """A failed exec raises CommandNotFoundError or CommandNotExecutableError."""
    with pytest.raises(error):
        Child([str(bin_dir / name)], os.environ)


def test_a_child_dies_with_the_process_that_started_it():
    """PDEATHSIG: SIGKILL the process that used Child, and its child goes too."""
    assert_dies_with_its_parent(MIDDLE, "the leaf")


def assert_dies_with_its_parent(script: str, what: str) -> None:
    """Run ``script`` (it prints a child's pid), SIGKILL it: the child must end."""
    lines = Lines()
    middle = lines.spawn(
        lambda: subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE
        )
    )
    pid = int(lines.readline())
    pidfd = os.pidfd_open(pid)
    try:
        # The standby leads its session once it has set itself up (it then waits).
        wait_until(lambda: os.getsid(pid) == pid, f"{what} leads a session")
        assert not readable(pidfd, 0.2)
        middle.kill()
        middle.wait(READ_TIMEOUT_S)
        assert readable(pidfd, READ_TIMEOUT_S), f"{what} outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(pidfd)
        if middle.stdin is not None:
            middle.stdin.close()
        middle.kill()
        middle.wait()
        lines.close()


# --- Standby: the command's process, forked ahead --------------------------------


def test_a_standby_runs_nothing_until_started_then_execs_with_the_grant(tmp_path):
    """Forked ahead, it waits; started, it execs with the environment it was sent."""
    out = tmp_path / "out"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "KEPT": "1",
        "LEADERRUN_FENCING_TOKEN": "0",
    }
    script = f'echo "$KEPT $LEADERRUN_FENCING_TOKEN $$" > {out}'
    standby = Standby("/bin/sh", ["sh", "-c", script], env=env)
    try:
        wait_until(lambda: os.getsid(standby.pid) == standby.pid, "its own session")
        # Named apart from leaderrun (`pkill leaderrun` leaves it to leaderrun).
        comm = Path(f"/proc/{standby.pid}/comm").read_text().strip()
        assert comm == STANDBY_NAME.decode()
        time.sleep(0.2)
        assert not out.exists(), "the command ran before it was started"
        pid = standby.start({**env, "LEADERRUN_FENCING_TOKEN": "42"})
        assert pid == standby.pid
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert out.read_text() == f"1 42 {pid}\n"
    finally:
        standby.discard()


def test_a_discarded_standby_runs_nothing_and_is_reaped(tmp_path):
    """No grant: the standby ends without exec, and leaves no zombie behind."""
    out = tmp_path / "out"
    standby = Standby("/bin/sh", ["sh", "-c", f"touch {out}"])
    pid = standby.pid
    standby.discard()
    standby.discard()  # twice is harmless
    assert not out.exists()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_a_standby_stopped_from_outside_is_killed_and_never_runs_late(tmp_path):
    """No exec within the time the lease leaves: killed, the command never runs."""
    out = tmp_path / "out"
    standby = Standby("/bin/sh", ["sh", "-c", f"touch {out}"])
    wait_until(lambda: os.getsid(standby.pid) == standby.pid, "its own session")
    os.kill(standby.pid, signal.SIGSTOP)
    began_s = time.monotonic()
    with pytest.raises(CommandNotExecutableError, match=r"did not exec within 0\.5s"):
        standby.start(dict(os.environ), within_s=0.5)
    assert 0.5 <= time.monotonic() - began_s < READ_TIMEOUT_S
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(standby.pid, os.WNOHANG)
    assert not out.exists()


def test_a_standby_whose_command_vanished_says_so(tmp_path):
    """The exec fails (the file went away since it was resolved): exit 127's error."""
    gone = tmp_path / "gone"
    standby = Standby(str(gone), [str(gone)])
    with pytest.raises(CommandNotFoundError):
        standby.start(dict(os.environ))


def test_a_standby_dies_with_the_process_that_forked_it():
    """PDEATHSIG before the grant: SIGKILL its parent, and the waiting standby goes."""
    assert_dies_with_its_parent(STANDBY_MIDDLE, "the standby")


# --- Supervisor, in this process -----------------------------------------------
#
# Only commands that leave no orphan run here: an orphan's zombie belongs to
# whoever adopts it, here not us, and the group is not empty until it is reaped.


def test_a_command_that_exits_by_itself_gives_its_status(setups):
    """The command's own exit ends supervision with its status; nothing is signalled."""
    setup = setups(sys.executable, "-c", "raise SystemExit(3)")
    assert setup.run() == Outcome(3, stopped_because=None)
    assert setup.events == []
    assert setup.watch.frozen_at_s is None


def test_a_loss_reported_by_the_watch_stops_the_command(setups):
    """A lease reported lost stops the command at once with the reason; freeze first."""
    setup = setups(*handshake_child())
    (pid,) = setup.lines.ready_pids(1)
    setup.watch.lose("the lease was taken over (token 7 is no longer current)")
    outcome = setup.run()
    assert outcome == Outcome(
        -signal.SIGTERM,
        stopped_because="the lease was taken over (token 7 is no longer current)",
    )
    assert setup.lines.rest() == [f"SIGTERM {pid}"]
    assert setup.sent() == ["freeze", "group SIGTERM"]


def test_a_passed_deadline_wins_over_a_child_that_already_died(setups):
    """Woken past the deadline, the run is a loss even if the child is already dead.

    A watchdog may have killed it while leaderrun was stopped; its status must not
    be passed off as the command's own.
    """
    setup = setups(sys.executable, "-c", "raise SystemExit(3)")
    assert setup.lines.rest() == []  # EOF: the command has exited
    setup.watch.deadline_s = boottime() - 1.0
    outcome = setup.run()
    assert outcome.stopped_because == "no renewal succeeded before the kill deadline"
    assert outcome.returncode == 3
    assert setup.sent()[0] == "freeze"


EXIT_ON_USR1 = """
import os, signal
signal.signal(signal.SIGUSR1, lambda *_: os._exit(3))
print("ready", flush=True)
while True:
    signal.pause()
"""


def test_a_command_that_exits_in_the_tick_the_deadline_passes_keeps_its_status(
    setups,
):
    """A command that exited since the supervisor's last look, a tick ago, ended as
    it chose, even though the deadline passed within that tick: reap first."""
    setup = setups(sys.executable, "-c", EXIT_ON_USR1)
    assert setup.lines.readline() == "ready"
    offset_s = [0.0]
    looks: list[float] = []

    def clock() -> float:
        return boottime() + offset_s[0]

    watch = setup.watch
    watch.deadline_s = clock() + 0.05
    snapshot = watch.snapshot

    def snapshot_then_act():
        if len(looks) == 1:
            # Between the first look and the second, the command exits...
            os.kill(setup.child.pid, signal.SIGUSR1)
            os.waitid(os.P_PID, setup.child.pid, os.WEXITED | os.WNOWAIT)
            offset_s[0] += 0.06  # ... and the deadline passes
        looks.append(clock())
        return snapshot()

    watch.snapshot = snapshot_then_act
    with SignalInbox() as inbox:
        outcome = Supervisor(
            setup.child, inbox, watch, setup.grace_s, clock=clock
        ).run()
    assert looks[-1] >= watch.deadline_s, "the deadline had passed when it looked"
    assert outcome == Outcome(3)
    assert "freeze" not in setup.sent()


# --- Supervisor, as a subreaper in a fresh interpreter -------------------------
#
# Each scenario below runs in a new interpreter that calls become_subreaper()
# first, as leaderrun does, and returns what it saw as JSON; the test asserts.

ScenarioResult = dict[str, Any]


def to_the_group(sent: list[str]) -> list[str]:
    """The events without signals to adopted processes.

    Once the command has died, a grandchild that left the group may already be
    ours, and signalled as adopted too: whether it is depends on who runs first.
    Such a process may then print the same signal twice, which is why the tests
    below compare sets of lines.
    """
    return [event for event in sent if not event.startswith("adopted ")]


def run_scenario(name: str, *args: str) -> ScenarioResult:
    """Run ``SCENARIOS[name](*args)`` in a fresh subreaper interpreter; return it."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from leaderrun.supervisor import become_subreaper\n"
            "from tests.unit.test_supervisor import SCENARIOS\n"
            "become_subreaper()\n"
            "print(json.dumps(SCENARIOS[sys.argv[1]](*sys.argv[2:])))",
            name,
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=READ_TIMEOUT_S * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: ScenarioResult = json.loads(done.stdout)
    return result


def proc_state(pid: int) -> tuple[str, int]:
    """The state letter and parent pid of ``pid``, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def reaped(pid: int) -> bool:
    """Whether ``pid``, once our child, is gone without a zombie left."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
    return False


def scenario_deadline(*child_args: str) -> ScenarioResult:
    """Let the kill deadline pass 0.2 s after the handshake; report the stop."""
    setup = Setup(handshake_child(*child_args))
    pids = setup.lines.ready_pids(2 if "--grandchild" in child_args else 1)
    setup.watch.deadline_s = boottime() + 0.2
    outcome = setup.run()
    ended_s = boottime()
    assert setup.watch.frozen_at_s is not None
    return {
        "pids": sorted(pids),
        "outcome": [outcome.returncode, outcome.stopped_because],
        "lines": sorted(setup.lines.rest()),
        "sent": setup.sent(),
        "late_s": setup.watch.frozen_at_s - setup.watch.deadline_s,
        "stopping_s": ended_s - setup.watch.frozen_at_s,
        "reaped": all(reaped(pid) for pid in pids),
    }


def scenario_leave_behind(events_path: str, how: str) -> ScenarioResult:
    """The command exits 5, leaving a SIGTERM-ignoring child in or out of its group."""
    setup = Setup(
        [sys.executable, "-c", LEAVE_BEHIND, events_path, how, CHILD, "--ignore-term"]
    )
    (left,) = setup.lines.ready_pids(1)
    left_pgid = os.getpgid(left)
    outcome = setup.run()
    return {
        "command": setup.child.pid,
        "left": left,
        "left_pgid": left_pgid,
        "outcome": [outcome.returncode, outcome.stopped_because],
        "lines": setup.lines.rest(),
        "sent": setup.sent(),
        "reaped": reaped(left),
    }


def scenario_forward() -> ScenarioResult:
    """Send USR1, INT and INT again to ourselves; forward each one."""
    setup = Setup(handshake_child("--grandchild", "--ignore-term"))
    pids = setup.lines.ready_pids(2)
    lines: dict[str, list[str]] = {}
    alive_after_first_int = False
    with SignalInbox() as inbox:
        supervisor = setup.supervisor(inbox)
        for signum in (signal.SIGUSR1, signal.SIGINT):
            signal_self(signum)
            supervisor.forward_signals()
            lines[signal.Signals(signum).name] = sorted(
                [setup.lines.readline(), setup.lines.readline()]
            )
        alive_after_first_int = not any(pid_gone(pid) for pid in pids)
        signal_self(signal.SIGINT)
        supervisor.forward_signals()
    return {
        "pids": sorted(pids),
        "lines": lines,
        "alive_after_first_int": alive_after_first_int,
        "returncode": setup.child.returncode,
        "after_second_int": setup.lines.rest(),
        "sent": setup.sent(),
        "reaped": all(reaped(pid) for pid in pids),
    }


class WaitingInbox(SignalInbox):
    """A SignalInbox that tells when the supervisor first waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout_s: float) -> list[int]:
        self.waiting.set()
        return super().wait(timeout_s)


def scenario_signal_during_grace() -> ScenarioResult:
    """Send USR1, USR2 and HUP to ourselves while the kill grace is running.

    Only the grace loop waits on the inbox (run() polls), so the signals are
    sent once the supervisor is waiting out the grace, where it spends its time.
    """
    setup = Setup(handshake_child("--ignore-term"), grace_s=2.0)
    (pid,) = setup.lines.ready_pids(1)
    setup.watch.deadline_s = boottime()
    seen: list[str] = []

    inbox = WaitingInbox()
    with inbox:

        def signal_during_the_grace() -> None:
            # Blocked here, the signals can only be handled by the main thread.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
            if inbox.waiting.wait(READ_TIMEOUT_S):
                for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
                    os.kill(os.getpid(), signum)
            seen.extend(setup.lines.rest())

        helper = threading.Thread(target=signal_during_the_grace)
        helper.start()
        setup.supervisor(inbox).run()
    helper.join(READ_TIMEOUT_S)
    return {"pid": pid, "seen": seen}


def scenario_reap_adopted() -> ScenarioResult:
    """The command exits 7 and its forked child exits right after it."""
    lines = Lines()
    child = lines.spawn(lambda: Child([sys.executable, "-c", ORPHAN], os.environ))
    child.watch()
    orphan = int(lines.readline())
    orphan_fd = os.pidfd_open(orphan)
    exited = readable(child.pidfd, READ_TIMEOUT_S)
    exited = exited and readable(orphan_fd, READ_TIMEOUT_S)
    state, parent = proc_state(orphan)
    status = child.reap()
    return {
        "me": os.getpid(),
        "exited": exited,
        "orphan_before": [state, parent],
        "status": status,
        "orphan_reaped": reaped(orphan),
        "gone": child.gone(),
    }


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "deadline": scenario_deadline,
    "leave_behind": scenario_leave_behind,
    "forward": scenario_forward,
    "signal_during_grace": scenario_signal_during_grace,
    "reap_adopted": scenario_reap_adopted,
}


@pytest.mark.slow
def test_reap_also_reaps_orphans_adopted_as_subreaper():
    """As a subreaper, reap() returns the status and reaps the command's orphan."""
    result = run_scenario("reap_adopted")
    assert result["exited"]
    assert result["orphan_before"] == ["Z", result["me"]], "adopted, then exited"
    assert result["status"] == 7
    assert result["orphan_reaped"]
    assert result["gone"]


@pytest.mark.slow
@pytest.mark.timing
def test_at_the_deadline_the_group_gets_sigterm():
    """At the kill deadline, not before: freeze, then SIGTERM to the whole group."""
    result = run_scenario("deadline", "--grandchild")
    assert result["outcome"] == [-signal.SIGTERM, DEADLINE_REASON]
    assert set(result["lines"]) == {f"SIGTERM {pid}" for pid in result["pids"]}
    assert to_the_group(result["sent"]) == ["freeze", "group SIGTERM"]
    assert 0 <= result["late_s"] < READ_TIMEOUT_S / 2
    assert result["stopping_s"] < GRACE_S, "a cooperative group is not made to wait"
    assert result["reaped"]


@pytest.mark.slow
@pytest.mark.timing
def test_a_group_ignoring_sigterm_is_killed_after_the_grace():
    """A group that ignores SIGTERM is SIGKILLed once the grace is over, not before."""
    result = run_scenario("deadline", "--grandchild", "--ignore-term")
    assert result["outcome"] == [-signal.SIGKILL, DEADLINE_REASON]
    assert set(result["lines"]) == {f"SIGTERM {pid}" for pid in result["pids"]}
    assert to_the_group(result["sent"]) == ["freeze", "group SIGTERM", "group SIGKILL"]
    assert GRACE_S <= result["stopping_s"] < GRACE_S + READ_TIMEOUT_S / 2
    assert result["reaped"]


@pytest.mark.slow
def test_finish_group_stops_what_the_command_left_in_its_group(tmp_path):
    """A process left behind in the group gets SIGTERM, then SIGKILL, once each.

    Once the command has exited it is our child too, but it is not signalled a
    second time as adopted: it is still in the group.
    """
    result = run_scenario("leave_behind", str(tmp_path / "events"), "same-group")
    assert result["left_pgid"] == result["command"]
    assert result["outcome"] == [5, None]
    assert set(result["lines"]) == {f"SIGTERM {result['left']}"}
    assert result["sent"] == ["group SIGTERM", "group SIGKILL"]
    assert result["reaped"]


@pytest.mark.slow
def test_finish_group_stops_a_daemon_that_left_the_group(tmp_path):
    """A setsid descendant is adopted by the subreaper and stopped all the same."""
    result = run_scenario("leave_behind", str(tmp_path / "events"), "setsid")
    assert result["left_pgid"] == result["left"] != result["command"]
    assert result["outcome"] == [5, None]
    assert set(result["lines"]) == {f"SIGTERM {result['left']}"}
    assert result["sent"] == [
        "group SIGTERM",
        "adopted SIGTERM x1",
        "group SIGKILL",
        "adopted SIGKILL x1",
    ]
    assert result["reaped"]


@pytest.mark.slow
def test_signals_are_forwarded_to_the_group_and_a_second_sigint_kills():
    """Each signal reaches every process of the group; a second SIGINT is SIGKILL."""
    result = run_scenario("forward")
    pids = result["pids"]
    assert result["lines"] == {
        "SIGUSR1": [f"SIGUSR1 {pid}" for pid in pids],
        "SIGINT": [f"SIGINT {pid}" for pid in pids],
    }
    assert result["alive_after_first_int"], "the first SIGINT is only forwarded"
    assert result["returncode"] == -signal.SIGKILL
    assert result["after_second_int"] == []
    assert to_the_group(result["sent"]) == [
        "group SIGUSR1",
        "group SIGINT",
        "group SIGKILL",
    ]
    assert result["reaped"]


@pytest.mark.slow
def test_signals_received_during_the_kill_grace_are_forwarded():
    """A signal received while the kill grace runs still reaches the group."""
    result = run_scenario("signal_during_grace")
    pid = result["pid"]
    # Signals pending together are delivered lowest number first: compare sets.
    assert set(result["seen"]) == {
        f"SIGTERM {pid}",
        f"SIGUSR1 {pid}",
        f"SIGUSR2 {pid}",
        f"SIGHUP {pid}",
    }
