"""Tools for the local-fault scenarios: leaderrun on either store, a stalled pipe.

:class:`Local` starts the real ``leaderrun`` console script (its process name is
``leaderrun``, as on a user's machine) on one lock of one store, running the fault
suite's ``job.py``, whose starts the shared :class:`~tests.faults.conftest.Timeline`
records; the one property is the same as everywhere: no two tokens' children ran
at the same moment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import JOB, WAIT_S, Timeline
from tests.helpers.processes import stat_fields
from tests.helpers.waiting import wait_until

LEADERRUN = str(Path(sys.executable).with_name("leaderrun"))
"""The installed console script: the program users run, with its own name."""

LEASE = ("--lease-duration", "4s")

STORES = [
    pytest.param("postgres", marks=pytest.mark.pg),
    pytest.param("sqlite"),
]
"""Both lease stores, for scenarios that concern leaderrun rather than a store."""

SYSCALL_WRITE = 1
"""x86-64 syscall number of write(2), as /proc/PID/task/TID/syscall shows it."""


def store_dsn(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> str:
    """The session's PostgreSQL, or a SQLite file of the test's own."""
    if kind == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    return f"sqlite://{tmp_path}/leases.db"


class Local:
    """leaderrun processes on one lock of one store; their jobs on a timeline."""

    def __init__(self, dsn: str, lock: str, directory: Path) -> None:
        self.dsn = dsn
        self.kind = "sqlite" if dsn.startswith("sqlite:") else "postgres"
        self.lock = lock
        self.dir = directory
        self.timeline = Timeline(directory / "events")
        self.procs: list[subprocess.Popen[bytes]] = []

    def argv(
        self, *args: str, job: tuple[str, ...] = (), launcher: tuple[str, ...] = ()
    ) -> list[str]:
        """leaderrun's command line (``launcher`` replaces the console script)."""
        return [
            *(launcher or (LEADERRUN,)),
            "--dsn",
            self.dsn,
            "--lock-id",
            self.lock,
            *LEASE,
            *args,
            "--",
            sys.executable,
            JOB,
            str(self.timeline.path),
            *job,
        ]

    def start(
        self,
        *args: str,
        stderr: int | None = None,
        stdout: int = subprocess.DEVNULL,
        job: tuple[str, ...] = (),
        launcher: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start leaderrun; its stderr goes to ``stderr`` (an fd) or a log file,
        its stdout to ``stdout`` (an fd) or nowhere."""
        log = None
        if stderr is None:
            log = open(self.dir / f"leaderrun-{len(self.procs)}.stderr", "wb")  # noqa: SIM115
            stderr = log.fileno()
        try:
            proc = subprocess.Popen(
                self.argv(*args, job=job, launcher=launcher),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        finally:
            if log is not None:
                log.close()
        proc.log_path = None if log is None else Path(log.name)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        path: Path | None = proc.log_path  # type: ignore[attr-defined]
        return "" if path is None else path.read_text(errors="replace")

    def holder(self, *args: str, **kw) -> tuple[subprocess.Popen[bytes], int]:
        """Start leaderrun and wait until its job runs; return it and its token."""
        before = max(self.timeline.tokens(), default=0)
        proc = self.start(*args, **kw)
        first = self.timeline.wait_start(before)
        return proc, first.token

    def operator(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an operator's subcommand (status, release) on the same lock."""
        return subprocess.run(
            [LEADERRUN, *args, "--dsn", self.dsn, "--lock-id", self.lock],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for started in self.timeline.snapshot():
            with contextlib.suppress(ProcessLookupError):
                os.kill(started.pid, signal.SIGKILL)
        self.timeline.close()


@contextlib.contextmanager
def stalled_pipe() -> Iterator[int]:
    """The write end of a pipe that is full and that nobody reads.

    What a leaderrun under journald or a container's log shim stuck on a slow
    disk, or `2>&1 | tee /hung/nfs/log`, has for its stderr: every write blocks.
    The read end stays open (a closed one would give EPIPE, not a stall).
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for chunk in (65536, 4096, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_fd, b"x" * chunk)
    # The flag is on the open file description the child inherits: clear it, so
    # that the child's writes block as they would on a stalled reader.
    os.set_blocking(write_fd, True)
    try:
        yield write_fd
    finally:
        os.close(write_fd)
        os.close(read_fd)


def threads_in_syscall(pid: int, number: int) -> list[int]:
    """The threads of ``pid`` blocked in syscall ``number`` right now."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
                if fields and fields[0] == str(number):
                    found.append(int(tid))
    return found


def _session(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[3])


def watchdog_of(proc: subprocess.Popen[bytes]) -> int:
    """The pid of ``proc``'s watchdog: a process forked from it (so with its
    command line) that left its session (so not one of its children)."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    session = _session(proc.pid)

    def find() -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == proc.pid:
                continue
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/cmdline").read_bytes() != cmdline:
                    continue
                if _session(int(entry)) not in (None, session):
                    return int(entry)
        return None

    pid: int = wait_until(find, "the watchdog process")
    return pid
