"""The fault harness: contenders behind proxies, a shared timeline, the one property.

Every scenario starts real ``leaderrun`` processes for one lock, each through its
own :class:`~tests.faults.proxy.Proxy`, running ``job.py``. The job's processes
append their start (token, pid, CLOCK_BOOTTIME) to a shared file; a thread here
opens a pidfd for each as soon as it appears and records, on the same clock, when
it actually disappeared. :meth:`Timeline.check` then asserts the property every
scenario shares: no two tokens' running intervals overlap, and tokens increase in
start order.

Each scenario records its failover time (fault to the next child start) as a
multiple of the lease; the table is printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

from tests.faults.proxy import Proxy
from tests.helpers.intervals import NOT_ENDED, find_overlaps
from tests.helpers.waiting import wait_until

JOB = str(Path(__file__).parent / "job.py")
SABOTAGE = str(Path(__file__).parent / "sabotage.py")

LEASE_S = 4.0
"""The suite's lease: renew every 0.67 s, SIGTERM 2.33 s and SIGKILL 3 s after the
last renewal was sent, so a scenario takes seconds."""

WAIT_S = 40.0
"""The bound on anything a scenario waits for; generous for a loaded 2-core host."""


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Proc:
    """One process of a job incarnation, as the timeline saw it."""

    token: int
    pid: int
    start_s: float
    end_s: float = float("inf")


@dataclass
class Timeline:
    """Starts read from the events file; ends recorded from pidfds."""

    path: Path
    procs: list[Proc] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.path.touch()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        offset = 0
        fds: dict[int, Proc] = {}
        poller = select.poll()
        while not self._stop.is_set():
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode().splitlines():
                _, token, pid, stamp = line.split()
                proc = Proc(int(token), int(pid), float(stamp))
                try:
                    fd = os.pidfd_open(proc.pid)
                except ProcessLookupError:
                    # Gone before we looked: now is later than its end, which
                    # can only make an interval longer (a false alarm, never a
                    # missed overlap).
                    proc.end_s = boottime()
                else:
                    fds[fd] = proc
                    poller.register(fd, select.POLLIN)
                with self._lock:
                    self.procs.append(proc)
            for fd, _ in poller.poll(10):
                fds[fd].end_s = boottime()
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> list[Proc]:
        with self._lock:
            return [Proc(p.token, p.pid, p.start_s, p.end_s) for p in self.procs]

    def tokens(self) -> list[int]:
        """The tokens that ran, in order of first start."""
        seen: list[int] = []
        for p in sorted(self.snapshot(), key=lambda p: p.start_s):
            if p.token not in seen:
                seen.append(p.token)
        return seen

    def intervals(self) -> dict[int, tuple[float, float]]:
        """Per token: first start, last end among all its processes."""
        spans: dict[int, tuple[float, float]] = {}
        for p in self.snapshot():
            start, end = spans.get(p.token, (p.start_s, p.end_s))
            spans[p.token] = (min(start, p.start_s), max(end, p.end_s))
        return spans

    def running(self, token: int) -> list[int]:
        """The pids of ``token`` still running."""
        return [
            p.pid
            for p in self.snapshot()
            if p.token == token and p.end_s == float("inf")
        ]

    def wait_start(self, after_token: int = 0, count: int = 1) -> Proc:
        """Wait for ``count`` processes of a token above ``after_token``; the first."""

        def found() -> Proc | None:
            newer = [p for p in self.snapshot() if p.token > after_token]
            if len(newer) < count:
                return None
            return min(newer, key=lambda p: p.start_s)

        proc: Proc = wait_until(found, f"a child with a token above {after_token}")
        return proc

    def overlaps(self) -> list[str]:
        """Each pair of tokens, neighbours in start order, whose intervals overlap."""
        found = []
        for o in find_overlaps(self.intervals()):
            until = (
                "is still running"
                if o.earlier_end == NOT_ENDED
                else f"ran {o.earlier_end - o.later_start:.2f}s"
            )
            found.append(f"token {o.earlier} {until} after token {o.later} started")
        return found

    def check(self) -> None:
        """The property: no overlap, and tokens increase in start order."""
        assert self.overlaps() == []
        tokens = self.tokens()
        assert tokens == sorted(tokens), f"tokens out of start order: {tokens}"


@dataclass
class Figure:
    scenario: str
    outcome: str
    failover_x_lease: float | None


FIGURES: list[Figure] = []


def record_figure(scenario: str, outcome: str, failover_s: float | None) -> None:
    """Note a scenario's outcome and failover time for the closing table."""
    FIGURES.append(
        Figure(scenario, outcome, None if failover_s is None else failover_s / LEASE_S)
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the failover table of the scenarios that ran."""
    if not FIGURES:
        return
    terminalreporter.section(f"fault scenarios (lease {LEASE_S:g} s)")
    terminalreporter.write_line(f"{'scenario':44} {'failover/lease':>14}  outcome")
    for f in FIGURES:
        multiple = "-" if f.failover_x_lease is None else f"{f.failover_x_lease:.2f}"
        terminalreporter.write_line(f"{f.scenario:44} {multiple:>14}  {f.outcome}")


class Node:
    """One leaderrun contender, behind its own proxy."""

    def __init__(
        self,
        harness: Harness,
        name: str,
        job_args: tuple[str, ...],
        leaderrun_args: tuple[str, ...],
        env: dict[str, str],
        sabotage: str | None,
        proxy_mode: str,
        dsn_extra: str,
    ) -> None:
        self.name = name
        self.proxy = Proxy(harness.host, harness.port)
        self.proxy.set_mode(proxy_mode)
        dsn = (
            f"host={harness.host} port={self.proxy.port} dbname=postgres "
            f"user=postgres {dsn_extra}"
        )
        launcher = [sys.executable, "-m", "leaderrun"]
        if sabotage is not None:
            launcher = [sys.executable, SABOTAGE, sabotage]
        self.argv = [
            *launcher,
            "--dsn",
            dsn,
            "--lock-id",
            harness.lock,
            "--lease-duration",
            f"{harness.lease_s:g}s",
            *leaderrun_args,
            "--",
            sys.executable,
            JOB,
            str(harness.timeline.path),
            *job_args,
        ]
        self.stderr_path = harness.dir / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **env},
                cwd=Path(__file__).parent.parent.parent,
            )
        self.pid = self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_busy(self) -> None:
        """Wait until this node has found the lock held and is waiting for it."""
        wait_until(lambda: "is held; retrying" in self.stderr(), f"{self.name} waits")

    def wait(self, timeout_s: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{self.name} still running after {timeout_s}s:\n{self.stderr()}"
            )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proxy.close()


class Harness:
    """The nodes, the timeline and the lock of one scenario."""

    def __init__(self, host: str, port: int, lock: str, directory: Path) -> None:
        self.host = host
        self.port = port
        self.lock = lock
        self.dir = directory
        self.lease_s = LEASE_S
        self.timeline = Timeline(directory / "events")
        self.nodes: list[Node] = []

    def node(
        self,
        name: str,
        *job_args: str,
        args: tuple[str, ...] = ("--wait",),
        env: dict[str, str] | None = None,
        sabotage: str | None = None,
        proxy_mode: str = "pass",
        dsn_extra: str = "",
    ) -> Node:
        """Start a leaderrun contender (waiting, by default) running the job.

        It logs at debug level (``-vv``), so a test can see it wait and renew.
        """
        node = Node(
            self,
            name,
            job_args,
            ("-vv", *args),
            env or {},
            sabotage,
            proxy_mode,
            dsn_extra,
        )
        self.nodes.append(node)
        return node

    def holder(self, name: str = "holder", *job_args: str, **kw) -> tuple[Node, Proc]:
        """Start a node, and wait until its child runs; return both."""
        before = max(self.timeline.tokens(), default=0)
        node = self.node(name, *job_args, **kw)
        proc = self.timeline.wait_start(before)
        return node, proc

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()
        # Whatever the nodes left behind (a daemon that escaped, on a failure).
        for proc in self.timeline.snapshot():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        self.timeline.close()


@pytest.fixture
def harness(pg_cluster, lock_name, tmp_path) -> Iterator[Harness]:
    """A scenario's harness on the session's server, cleaned up whatever happens."""
    made = Harness(pg_cluster.host, pg_cluster.port, lock_name, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def _needs(what: str) -> NoReturn:
    """Skip a scenario the session's server can't host; in CI, fail it."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"this scenario {what}", pytrace=False)
    pytest.skip(f"this scenario {what}")


@pytest.fixture
def local_cluster(pg_cluster):
    """The session's server, when its processes are ours to signal (SIGSTOP)."""
    if not pg_cluster.local:
        _needs(
            "signals the server's processes: it needs the throwaway local cluster "
            "(a container's pids are in another namespace, maybe another machine)"
        )
    return pg_cluster


@pytest.fixture
def restartable_cluster(pg_cluster):
    """The session's server, when this session started it (stop, start, restart)."""
    if not pg_cluster.restartable:
        _needs("stops the server: it needs one this session started")
    return pg_cluster
