"""The stamper (bench/stamp.c), built at run time, and the jobs it runs as.

Every hand-off figure has a stamper at both ends: the holder's child prints
the time as it exits, the waiter's child as it starts. It is C so that no
interpreter's start-up is counted, and it reads ``CLOCK_BOOTTIME``, one clock
for every process of the machine, as :func:`boottime_ns` does here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("stamp.c")
COMPILE_TIMEOUT_S = 60.0


class StamperError(RuntimeError):
    """The stamper could not be built: the figures that need it are not measured."""


def boottime_ns() -> int:
    """Now on ``CLOCK_BOOTTIME``, the stamper's clock, in nanoseconds."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Stamper:
    """bench/stamp.c compiled into ``workdir`` on first use, once per run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        """The compiled stamper; built now if it is not yet.

        Raises:
            StamperError: no C compiler, or the compile failed; the message
                says which, for the figure's row.
        """
        if self._path is None:
            self._path = build(self.workdir)
        return self._path

    def start(self) -> list[str]:
        """A child that prints the time as it starts, then exits."""
        return [str(self.path)]

    def hold(self) -> list[str]:
        """A job: says ``ready <pid>``, and prints the time as it exits on SIGUSR1."""
        return [str(self.path), "hold"]


def build(workdir: Path) -> Path:
    """Compile bench/stamp.c with ``$CC`` (default ``cc``) ``-O2`` into ``workdir``."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise StamperError(
            f"no C compiler ({compiler!r} is not on PATH): the hand-off figures "
            f"build their stamper from {SOURCE.name}"
        )
    target = workdir / "stamp"
    done = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(target), str(SOURCE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise StamperError(f"{compiler} could not build {SOURCE.name}: {done.stderr}")
    return target


@dataclass(frozen=True)
class Job:
    """A running stamper ``hold``, known by its pid and its start time.

    The start time (field 22 of /proc/PID/stat, in clock ticks since boot) tells
    the job from a later process that reuses its pid.
    """

    pid: int
    started_ticks: int

    @classmethod
    def from_ready(cls, line: str) -> Job:
        """The job that printed ``line`` (``ready <pid>``) just now."""
        word, _, pid = line.strip().partition(" ")
        if word != "ready" or not pid.isdigit():
            raise RuntimeError(f"the job did not start: {line!r}")
        fields = _stat_fields(int(pid))
        if fields is None:
            raise RuntimeError(f"the job {pid} is already gone")
        return cls(int(pid), int(fields[19]))

    def alive(self) -> bool:
        """Whether the job still runs: a zombie has ended, only not yet been reaped."""
        fields = _stat_fields(self.pid)
        return (
            fields is not None
            and int(fields[19]) == self.started_ticks
            and fields[0] not in ("Z", "X", "x")
        )

    def end(self) -> None:
        """Let the job exit (SIGUSR1: it prints its time and exits)."""
        if self.alive():
            os.kill(self.pid, signal.SIGUSR1)

    def kill(self) -> None:
        """Kill the job if it still runs: an orphan must not outlive the bench."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command's name: state first; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may itself hold spaces or parentheses.
    return text.rpartition(")")[2].split()
