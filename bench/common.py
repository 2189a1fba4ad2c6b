"""What several figures share: leaderrun's command line, timed processes, the database.

Every read from a child has a time bound (:data:`LINE_TIMEOUT_S`), so a figure
that goes wrong fails instead of hanging the bench.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from bench.stamp import Job, Stamper

LEADERRUN = str(Path(sys.executable).parent / "leaderrun")
LINE_TIMEOUT_S = 120.0


def leaderrun_argv(dsn: str, lock: str, *args: str) -> list[str]:
    """A leaderrun command line for ``lock``; options, ``--`` and a child follow."""
    return [LEADERRUN, "--dsn", dsn, "--lock-id", lock, *args]


def admin(dsn: str) -> psycopg.Connection[Any]:
    """A connection of the bench's own, told from leaderrun's by application name."""
    return psycopg.connect(dsn, autocommit=True, application_name="bench")


# --- processes ---------------------------------------------------------------


def start_holder(dsn: str, lock: str, lease: str, then: str) -> subprocess.Popen[str]:
    """A leaderrun holding ``lock``, returned once its child ``echo ready; THEN`` runs.

    ``then`` is shell; ``read x`` in it waits for :func:`let_go`. The holder is
    stopped if its child does not start.
    """
    holder = subprocess.Popen(
        [
            *leaderrun_argv(dsn, lock, "--lease-duration", lease, "--"),
            "sh",
            "-c",
            f"echo ready; {then}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        if readline(holder.stdout).strip() != "ready":
            raise RuntimeError("the holder did not start its child")
    except BaseException:
        stop(holder)
        raise
    return holder


def start_job(
    wrapper: list[str], stamper: Stamper, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], Job]:
    """``wrapper`` (a lock tool's argv up to its command) running a stamper job.

    Returned once the job runs, that is once the wrapper holds its lock; the
    job prints its end time on :meth:`Job.end`. The wrapper is stopped if its
    job does not start.
    """
    holder = subprocess.Popen(
        [*wrapper, *stamper.hold()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None
        return holder, Job.from_ready(readline(holder.stdout))
    except BaseException:
        stop(holder)
        raise


def let_go(holder: subprocess.Popen[str]) -> None:
    """Let a holder's child that waits on ``read x`` go on."""
    assert holder.stdin is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()


@dataclass
class Finished:
    """A process that ended: its status, wall time and CPU time."""

    status: int
    wall_s: float
    cpu_s: float


def run_timed(argv: list[str], env: dict[str, str] | None = None) -> Finished:
    """Run ``argv`` to the end; measure it with wait4's rusage (this child only)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(proc.returncode, wall_s, usage.ru_utime + usage.ru_stime)


# ru_maxrss from wait4 is useless for a child of a large process: Linux carries
# the parent's high-water mark across the child's execve. A small launcher that
# forks (fresh accounting) and execs the command gives the command's own peak.
_LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"maxrss {usage.ru_maxrss}\\n")
os._exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_kb(argv: list[str]) -> int:
    """The peak RSS of ``argv`` run to the end, in KiB."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCH, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    return int(done.stderr.rsplit("maxrss ", 1)[1])


def vm_hwm_kb(pid: int) -> int | None:
    """A live process's peak RSS so far (VmHWM), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def readline(stream: IO[str], timeout_s: float = LINE_TIMEOUT_S) -> str:
    """One line ("" at the end), or fail instead of hanging.

    Bytes are read one at a time from the file descriptor: ``stream.readline()``
    could take two lines from the pipe and keep the second in its buffer, where
    ``select`` does not see it, and the next call would wait for nothing.
    """
    fd = stream.fileno()
    deadline = time.monotonic() + timeout_s
    line = bytearray()
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise TimeoutError(f"no line within {timeout_s}s")
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


def read_ns(stream: IO[str], what: str, timeout_s: float = LINE_TIMEOUT_S) -> int:
    """A stamper's time (ns) from ``stream``; ``what`` names it if none comes."""
    line = readline(stream, timeout_s)
    if not line.strip().isdigit():
        raise RuntimeError(f"{what}: expected a time in ns, got {line!r}")
    return int(line)


def wait_for(stream: IO[str], needle: str) -> str:
    """Read lines until one contains ``needle``; return them."""
    seen: list[str] = []
    while True:
        line = readline(stream)
        if not line:
            raise RuntimeError(f"{needle!r} never came: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return "".join(seen)


STOP_TIMEOUT_S = 30.0
"""How long a process may take to leave after SIGTERM, then after SIGKILL."""


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM a leaderrun (it forwards to its child) and reap it.

    Past :data:`STOP_TIMEOUT_S` it is killed and only waited for: its pipes
    may be held open by a child that outlived it, so no EOF would come.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def tool_version(argv: list[str], timeout_s: float = LINE_TIMEOUT_S) -> str:
    """The first line a tool's ``--version`` prints (``argv``), or "unknown"."""
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    first = done.stdout.strip().splitlines()[:1]
    return first[0] if first else "unknown"


def median_ms(values_s: list[float]) -> float:
    """The median of durations in seconds, in milliseconds."""
    return statistics.median(values_s) * 1000
