"""The parent's side of ``tests.helpers.elector_proc``: one replica process, read."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0  # generous: the machine may be loaded


@dataclass(frozen=True)
class Sample:
    """One line of a replica with a token and an interval on CLOCK_BOOTTIME."""

    token: int
    t0: float
    t1: float


class Replica:
    """One elector process, its output gathered line by line by a thread."""

    def __init__(self, dsn: str, lock: str, lease_s: float, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.elector_proc",
                dsn,
                lock,
                f"{lease_s:g}",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)
        self._pumping.join(WAIT_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.drain()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def drain(self) -> list[str]:
        """Every line so far."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def samples(self, kind: str) -> list[Sample]:
        """The ``kind TOKEN T0 T1`` lines so far (kind: lead, unlead, work)."""
        return [
            Sample(int(token), float(t0), float(t1))
            for name, token, t0, t1 in (
                line.split() for line in self.drain() if line.startswith(kind + " ")
            )
            if name == kind
        ]

    def leads(self) -> list[tuple[int, float, float]]:
        """The leading samples so far, as (token, t0, t1)."""
        return [(s.token, s.t0, s.t1) for s in self.samples("lead")]
