"""Fixtures that start the real ``leaderrun`` command as subprocesses.

Every process a test starts is killed at teardown, whatever happened, so a
failing test cannot leave a child holding a lock for the next one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.helpers.processes import pid_gone

CHILD = str(Path(__file__).parent.parent / "helpers" / "child.py")
"""The handshake child: ``ready <pid>``, then one line per signal."""

FAST = ("--lease-duration", "4s")
"""A lease short enough for tests: renew every 0.67 s, kill deadline 2.3 s."""

READ_TIMEOUT_S = 15.0


def child(*args: str) -> list[str]:
    """The argv of the handshake child."""
    return [sys.executable, CHILD, *args]


# Keyed by id(), and holding the stream so that its id cannot be reused while
# the entry exists; Leaderrun.kill_all() drops the entries of closed streams.
_readers: dict[int, tuple[IO[str], queue.Queue[str]]] = {}


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """A queue fed with the stream's lines by a thread ('' at EOF).

    select() cannot be used on a buffered text stream: one read may pull in two
    lines, and select would then wait for data that is already in the buffer.
    """
    key = id(stream)
    if key not in _readers:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in iter(stream.readline, ""):
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        _readers[key] = (stream, lines)
    return _readers[key][1]


def readline(stream: IO[str], timeout_s: float = READ_TIMEOUT_S) -> str:
    """One line from a pipe, or fail after ``timeout_s``: never hang on a dead child."""
    try:
        return _lines(stream).get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"no line within {timeout_s}s")


def read_rest(stream: IO[str], timeout_s: float = READ_TIMEOUT_S) -> str:
    """Everything up to EOF (through the same queue as :func:`readline`)."""
    chunks = []
    while line := readline(stream, timeout_s):
        chunks.append(line)
    return "".join(chunks)


def wait_for_line(stream, needle: str, timeout_s: float = READ_TIMEOUT_S) -> list[str]:
    """Read lines until one contains ``needle``; return them all."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = readline(stream, max(0.01, deadline - time.monotonic()))
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    pytest.fail(f"{needle!r} not seen; got {lines!r}")


def wait_gone(pid: int, timeout_s: float) -> float:
    """Wait until ``pid`` is gone; return how long it took, or fail."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pid_gone(pid):
            return time.monotonic() - start
        time.sleep(0.005)
    pytest.fail(f"pid {pid} still alive after {timeout_s}s")


class Leaderrun:
    """Starts ``python -m leaderrun`` with the test database and lock."""

    def __init__(self, dsn: str, lock: str) -> None:
        self.dsn = dsn
        self.lock = lock
        self.procs: list[subprocess.Popen[str]] = []

    def argv(self, *args: str, lock: str | None = None) -> list[str]:
        """The full command line: leaderrun, the DSN and lock, then ``args``."""
        return [
            sys.executable,
            "-m",
            "leaderrun",
            "--dsn",
            self.dsn,
            "--lock-id",
            lock or self.lock,
            *args,
        ]

    def start(
        self, *args: str, env: dict[str, str] | None = None, **kw
    ) -> subprocess.Popen[str]:
        """Start leaderrun with pipes for stdout and stderr."""
        proc = subprocess.Popen(
            self.argv(*args),
            stdout=kw.pop("stdout", subprocess.PIPE),
            stderr=kw.pop("stderr", subprocess.PIPE),
            stdin=kw.pop("stdin", subprocess.DEVNULL),
            text=True,
            env={**os.environ, **(env or {})},
            **kw,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout_s: float = 60, **kw
    ) -> subprocess.CompletedProcess[str]:
        """Run leaderrun to completion."""
        proc = self.start(*args, **kw)
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_all(self) -> None:
        """SIGKILL every leaderrun started here, and everything below it."""
        for proc in self.procs:
            if proc.poll() is None:
                # Grandchildren do not get the parent-death signal and would
                # keep the pipes open: kill the whole tree, leaves first.
                for pid in reversed(descendants(proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    _readers.pop(id(stream), None)
                    stream.close()


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
        for child_pid in children:
            found.append(child_pid)
            found.extend(descendants(child_pid))
    return found


@pytest.fixture
def leaderrun(pg_dsn: str, lock_name: str) -> Iterator[Leaderrun]:
    """A factory of leaderrun processes on this test's own lock."""
    runner = Leaderrun(pg_dsn, lock_name)
    yield runner
    runner.kill_all()
