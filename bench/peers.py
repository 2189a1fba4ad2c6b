"""The peers: leaderrun beside ``etcdctl lock`` and ``flock``, in the same run.

Each tool runs a command under a lock its own way: leaderrun with a lease row in
PostgreSQL, ``etcdctl lock`` with a key under an etcd session lease (a
throwaway single-node etcd, bench/etcd.py), ``flock`` with the kernel's lock on
a file (one host only). Every figure measures the three one after the other in
each round, with the stamper (bench/stamp.c) as every child:

- start-up: ``TOOL ... -- true``, median wall time;
- hand-off: the holder's job exits -> the waiter's child starts;
- crash: ``kill -9`` of the holder's wrapper (the tool's own process) -> the
  waiter's child starts, as a multiple of the lease; and whether the job
  outlived its wrapper;
- coordinator pause: the coordinator (PostgreSQL's processes, the etcd server)
  SIGSTOPped for longer than the lease, then SIGCONTed: did the job run through
  the pause, and was it still running when the waiter's child started?

The old job "still running when the waiter's child started" is judged when the
bench reads the waiter's stamp, a few ms late: a short overlap can be missed, a
reported one is real.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from bench.common import (
    LINE_TIMEOUT_S,
    leaderrun_argv,
    read_ns,
    start_job,
    tool_version,
    wait_for,
)
from bench.common import stop as stop_process
from bench.etcd import Etcd, etcd_server, missing
from bench.handoff import stamped_handoff
from bench.report import PEERS, Results
from bench.stamp import Job, Stamper, StamperError, boottime_ns
from leaderrun import __version__

if TYPE_CHECKING:
    from tests.pg import LocalPgCluster

LEASE_S = 5
"""leaderrun's ``--lease-duration`` and etcdctl's ``--ttl``, in seconds."""

PAUSE_LEASES = 2.0
"""How long the coordinator is stopped, in leases: long enough for any to expire."""

POLL_S = 0.005
"""How often the bench looks whether a job still runs."""

WAIT_POLL_S = 0.02
"""How often the bench looks whether a waiter waits yet."""

TAKEOVER_LEASES = 2.0
"""How long after a crash or a pause a takeover is waited for, in leases."""

WOKEN = "was released; trying now"
"""leaderrun's -vv when a release's notification wakes a waiter (not its expiry)."""

OUTLIVED_S = 1.0
"""A job still running this long after its wrapper's ``kill -9`` outlived it."""


@dataclass(frozen=True)
class Tool:
    """One way to run a command under a lock: a column of the peers table."""

    name: str
    wrapper: Callable[[str, bool], list[str]]
    """The argv that holds lock ``name``, or waits for it (True), up to the command."""
    waiting: Callable[[str, subprocess.Popen[str]], str]
    """Returns once the waiter for lock ``name`` waits (with any of its log read)."""
    env: dict[str, str] | None = None
    coordinator: Callable[[], list[int]] | None = None
    """The pids to SIGSTOP for the pause figure, the first stopped first."""
    no_pause: str = ""
    """Why the pause figure does not apply, when ``coordinator`` is None."""
    takeover_within_s: float = TAKEOVER_LEASES * LEASE_S
    """How long a takeover is waited for after a crash or a pause."""
    about: str = ""
    """The tool's version and set-up, for RESULTS.md's notes."""
    woken: str = ""
    """What the waiter's log says when the release woke it, if it says so."""


@dataclass
class Watch:
    """What followed a fault, on ``CLOCK_BOOTTIME``: the old job's end, the new start.

    ``job_ended_ns`` is when the bench first saw the job gone (within
    :data:`POLL_S`); ``overlap`` is whether it still ran when the bench read
    the waiter's child's start.
    """

    fault_ns: int
    job_ended_ns: int | None = None
    started_ns: int | None = None
    overlap: bool = False

    def until(self, job: Job, waiter: subprocess.Popen[str], deadline_ns: int) -> None:
        """Watch ``job`` and the waiter until its child starts, or the deadline."""
        assert waiter.stdout is not None
        while self.started_ns is None and boottime_ns() < deadline_ns:
            if self.job_ended_ns is None and not job.alive():
                self.job_ended_ns = boottime_ns()
            if _readable(waiter.stdout, POLL_S):
                self.started_ns = read_ns(waiter.stdout, "the waiter's child's start")
                self.overlap = job.alive()
        if self.job_ended_ns is None and not job.alive():
            self.job_ended_ns = boottime_ns()

    def after_s(self, then_ns: int | None) -> float | None:
        """Seconds from the fault to ``then_ns``, or None if it never came."""
        return None if then_ns is None else (then_ns - self.fault_ns) / 1e9


def run(
    dsn: str,
    cluster: LocalPgCluster | None,
    stamper: Stamper,
    out: Results,
    *,
    runs: int,
    handoffs: int,
    failovers: int,
    pauses: int,
) -> None:
    """Every peers row: leaderrun, etcdctl lock and flock, round by round."""
    print(
        f"peers: start-up x{runs}, hand-off x{handoffs}, kill -9 x{failovers}, "
        f"coordinator pause x{pauses}; lease {LEASE_S} s"
    )
    try:
        stamper.path  # noqa: B018 (built now: a missing compiler is one row)
    except StamperError as exc:
        out.beside("peers", *(f"not measured: {exc}" for _ in PEERS))
        return
    with tools(dsn, cluster) as (measured, skipped):
        for name, reason in skipped.items():
            print(f"  {name}: skipped: {reason}")
        out.notes.append(
            "Peers: " + "; ".join(f"{tool.name}: {tool.about}" for tool in measured)
        )
        table = Table(skipped)
        # A count of 0 leaves its rows out, as --only leaves out a figure.
        if runs > 0:
            table.row(
                f"start-up: `TOOL ... -- true`, median wall of {runs}",
                startups(measured, runs),
            )
        if handoffs > 0:
            table.row(
                f"hand-off: holder's job exits -> waiter's child starts, "
                f"median (min-max) of {handoffs}",
                handoffs_ms(measured, handoffs, stamper),
            )
        crash_rows(table, measured, failovers, stamper)
        pause_rows(table, measured, pauses, stamper)
        table.write(out)


def crash_rows(
    table: Table, measured: list[Tool], failovers: int, stamper: Stamper
) -> None:
    """The takeover after ``kill -9`` of the holder's wrapper, and the job's fate."""
    if failovers < 1:
        return
    crashes: dict[str, list[Watch]] = {tool.name: [] for tool in measured}
    for _ in range(failovers):
        for tool in measured:
            crashes[tool.name].append(crash(tool, stamper))
    table.row(
        f"takeover after `kill -9` of the holder's wrapper, x lease "
        f"({LEASE_S} s; {failovers} runs)",
        {tool.name: _takeovers(tool, crashes[tool.name]) for tool in measured},
    )
    table.row(
        "the job outlived its wrapper's `kill -9`",
        {tool.name: _outlived(crashes[tool.name]) for tool in measured},
    )


def pause_rows(
    table: Table, measured: list[Tool], pauses: int, stamper: Stamper
) -> None:
    """The job through a stopped coordinator, and the takeover after it."""
    if pauses < 1:
        return
    paused: dict[str, list[Watch]] = {tool.name: [] for tool in measured}
    for _ in range(pauses):
        for tool in measured:
            if tool.coordinator is not None:
                paused[tool.name].append(pause(tool, stamper))
    table.row(
        f"coordinator SIGSTOPped for {LEASE_S * PAUSE_LEASES:g} s "
        f"({PAUSE_LEASES:g} x lease): did the job run on? ({pauses} runs)",
        {tool.name: _paused(tool, paused[tool.name]) for tool in measured},
    )
    table.row(
        "after the pause, the waiter's child started while the old job ran",
        {tool.name: _overlaps(tool, paused[tool.name]) for tool in measured},
    )


class Table:
    """The peers rows as they are measured, then added to the results at once."""

    def __init__(self, skipped: dict[str, str]) -> None:
        self.rows: list[tuple[str, dict[str, str]]] = []
        self.skipped = skipped

    def row(self, figure: str, cells: dict[str, str]) -> None:
        """One figure, one cell per measured tool; a skipped tool's says why."""
        self.rows.append((figure, cells))

    def write(self, out: Results) -> None:
        """The rows into ``out``, in :data:`PEERS` order."""
        for figure, cells in self.rows:
            out.beside(
                figure,
                *(
                    cells.get(name, f"skipped: {self.skipped.get(name, '?')}")
                    for name in PEERS
                ),
            )


# --- the tools ----------------------------------------------------------------


@contextlib.contextmanager
def tools(
    dsn: str, cluster: LocalPgCluster | None
) -> Iterator[tuple[list[Tool], dict[str, str]]]:
    """The tools this machine has, and why each other one is skipped.

    etcd's server and flock's lock files live only as long as the context.
    """
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        measured = [leaderrun_tool(dsn, cluster)]
        absent = missing()
        if absent is None:
            measured.append(etcd_tool(stack.enter_context(etcd_server())))
        else:
            skipped[PEERS[1]] = absent
        if shutil.which("flock") is None:
            skipped[PEERS[2]] = "flock not on PATH (Debian: util-linux)"
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-flock-"))
            )
            measured.append(flock_tool(workdir))
        yield measured, skipped


def leaderrun_tool(dsn: str, cluster: LocalPgCluster | None) -> Tool:
    """leaderrun with a 5 s lease; its waiter ``--wait``s, LISTENing."""

    def wrapper(lock: str, wait: bool) -> list[str]:
        # The waiter's lease is the holder's, as a fleet's nodes share settings;
        # its -vv says when it found the lock held (see ``waiting``).
        waits = ("--wait", "-vv") if wait else ()
        lease = f"{LEASE_S}s"
        return leaderrun_argv(dsn, lock, "--lease-duration", lease, *waits, "--")

    def waiting(lock: str, waiter: subprocess.Popen[str]) -> str:
        assert waiter.stderr is not None
        return wait_for(waiter.stderr, "is held; retrying")

    return Tool(
        PEERS[0],
        wrapper,
        waiting,
        coordinator=None if cluster is None else lambda: postgres_pids(cluster),
        no_pause="n/a: --dsn names a server the bench does not own",
        about=f"{__version__}, --lease-duration {LEASE_S}s",
        woken=WOKEN,
    )


def etcd_tool(etcd: Etcd) -> Tool:
    """``etcdctl lock --ttl 5 NAME -- CMD`` against the bench's own etcd."""

    def waiting(lock: str, waiter: subprocess.Popen[str]) -> str:
        # Each session puts one key under the lock's name, then the waiter
        # watches the key before its own (see Etcd.watching). The bench runs
        # one waiter at a time, and a finished one's watch ends with it.
        _poll(
            lambda: etcd.contenders(lock) >= 2 and etcd.watching(),
            waiter,
            f"etcd lock {lock}",
        )
        return ""

    return Tool(
        PEERS[1],
        lambda lock, _: etcd.lock_argv(lock, LEASE_S),
        waiting,
        env=etcd.env,
        coordinator=lambda: [etcd.process.pid],
        about=f"etcd and etcdctl {etcd.version}, one node on loopback, "
        f"data on tmpfs, --ttl {LEASE_S}",
    )


def flock_tool(workdir: Path) -> Tool:
    """``flock FILE CMD``: the kernel's lock on a file in ``workdir``."""

    def path(lock: str) -> Path:
        return workdir / f"{lock}.lock"

    def waiting(lock: str, waiter: subprocess.Popen[str]) -> str:
        inode = path(lock).stat().st_ino
        _poll(lambda: flock_blocked(inode), waiter, f"flock {path(lock)}")
        return ""

    return Tool(
        PEERS[2],
        lambda lock, _: ["flock", str(path(lock))],
        waiting,
        no_pause="n/a: no coordinator (the kernel's lock, one host)",
        # No lease ends a dead wrapper's lock: waiting longer shows nothing more.
        takeover_within_s=LEASE_S,
        about=tool_version(["flock", "--version"]),
    )


def flock_blocked(inode: int) -> bool:
    """Whether a process waits for a flock on ``inode`` (``->`` in /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: -> FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
        if len(fields) > 6 and fields[1] == "->" and fields[6].endswith(f":{inode}"):
            return True
    return False


def postgres_pids(cluster: LocalPgCluster) -> list[int]:
    """The bench cluster's postmaster, then every process it started."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(stat[1]) == postmaster:
                children.append(int(entry.name))
    # The postmaster first: stopped, it starts no new process behind our back.
    return [postmaster, *children]


# --- the figures ----------------------------------------------------------------


def startups(measured: list[Tool], runs: int) -> dict[str, str]:
    """``TOOL ... -- true``: median wall time of ``runs`` each, interleaved."""
    walls: dict[str, list[float]] = {tool.name: [] for tool in measured}
    lock = _lock("startup")
    for _ in range(runs):
        for tool in measured:
            began = time.perf_counter()
            subprocess.run(
                [*tool.wrapper(lock, False), "true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=tool.env,
                timeout=LINE_TIMEOUT_S,
                check=True,
            )
            walls[tool.name].append(time.perf_counter() - began)
    return {name: f"{statistics.median(s) * 1000:.1f} ms" for name, s in walls.items()}


def handoffs_ms(measured: list[Tool], rounds: int, stamper: Stamper) -> dict[str, str]:
    """Hand-offs with the stamper at both ends, ``rounds`` each, interleaved."""
    latencies: dict[str, list[float]] = {tool.name: [] for tool in measured}
    for i in range(rounds):
        for tool in measured:
            lock = _lock(f"handoff-{i}")
            done = stamped_handoff(
                tool.wrapper(lock, False),
                tool.wrapper(lock, True),
                stamper,
                waiting=functools.partial(tool.waiting, lock),
                env=tool.env,
            )
            if tool.woken not in done.log:
                raise RuntimeError(f"{tool.name}'s waiter was not woken: {done.log}")
            latencies[tool.name].append(done.latency_s * 1000)
    return {
        name: f"{statistics.median(ms):.1f} ms ({min(ms):.1f}-{max(ms):.1f})"
        for name, ms in latencies.items()
    }


def crash(tool: Tool, stamper: Stamper) -> Watch:
    """``kill -9`` of the holder's wrapper at a random point of its lease."""
    lock = _lock("crash")
    with holder_and_waiter(tool, lock, stamper) as (holder, job, waiter):
        # A random point of the renewal cycle (leaderrun renews every lease/3).
        time.sleep(random.uniform(0.5, 0.5 + LEASE_S / 3))
        watch = Watch(boottime_ns())
        holder.kill()
        watch.until(job, waiter, watch.fault_ns + _ns(tool.takeover_within_s))
        return watch


def pause(tool: Tool, stamper: Stamper) -> Watch:
    """The coordinator SIGSTOPped for :data:`PAUSE_LEASES` leases, then SIGCONTed.

    ``Watch.fault_ns`` is the pause's start; the takeover is waited for up to
    ``tool.takeover_within_s`` after the pause's end.
    """
    assert tool.coordinator is not None
    lock = _lock("pause")
    with holder_and_waiter(tool, lock, stamper) as (_, job, waiter):
        time.sleep(random.uniform(0.5, 0.5 + LEASE_S / 3))
        stopped: list[int] = []
        watch = Watch(boottime_ns())
        try:
            # Listed again until no new one: a child forked between the list
            # and its parent's stop shows in the next one (the parent is first).
            while fresh := [p for p in tool.coordinator() if p not in stopped]:
                for pid in fresh:
                    stopped.append(pid)
                    with contextlib.suppress(ProcessLookupError):  # it just ended
                        os.kill(pid, signal.SIGSTOP)
            watch.until(job, waiter, watch.fault_ns + _ns(PAUSE_LEASES * LEASE_S))
        finally:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        watch.until(job, waiter, boottime_ns() + _ns(tool.takeover_within_s))
        return watch


@contextlib.contextmanager
def holder_and_waiter(
    tool: Tool, lock: str, stamper: Stamper
) -> Iterator[tuple[subprocess.Popen[str], Job, subprocess.Popen[str]]]:
    """A holder running a stamper job, and a waiter that waits; all stopped after.

    The job is killed first: an orphan whose wrapper was killed must not
    outlive the figure, it holds the holder's stdout open (no EOF for
    :func:`stop_process`), and ``etcdctl`` waits for its job before leaving
    on SIGTERM.
    """
    holder, job = start_job(tool.wrapper(lock, False), stamper, tool.env)
    waiter = None
    try:
        waiter = subprocess.Popen(
            [*tool.wrapper(lock, True), *stamper.start()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=tool.env,
        )
        tool.waiting(lock, waiter)
        yield holder, job, waiter
    finally:
        job.kill()
        if waiter is not None:
            stop_process(waiter)
        stop_process(holder)


# --- the cells ------------------------------------------------------------------


def _takeovers(tool: Tool, watches: list[Watch]) -> str:
    ratios = [watch.after_s(watch.started_ns) for watch in watches]
    if all(r is None for r in ratios):
        return (
            f"none within {tool.takeover_within_s:g} s in {len(watches)} runs: "
            "the orphaned job still holds the lock"
        )
    return ", ".join("none" if r is None else f"{r / LEASE_S:.2f}" for r in ratios)


def _outlived(watches: list[Watch]) -> str:
    gone = [watch.after_s(watch.job_ended_ns) for watch in watches]
    ended = [s for s in gone if s is not None and s < OUTLIVED_S]
    if len(ended) == len(watches):
        return f"no: gone {max(ended) * 1000:.0f} ms after the kill at most"
    ran_on = f"**yes**, {len(watches) - len(ended)} of {len(watches)}"
    started = [watch for watch in watches if watch.started_ns is not None]
    if not started:
        return f"{ran_on}, and it kept the lock: no takeover"
    overlaps = sum(watch.overlap for watch in started)
    return (
        f"{ran_on}; still running when the waiter's child started: "
        f"{overlaps} of {len(started)}"
    )


def _paused(tool: Tool, watches: list[Watch]) -> str:
    if tool.coordinator is None:
        return tool.no_pause
    pause_s = PAUSE_LEASES * LEASE_S
    stopped = [watch.after_s(watch.job_ended_ns) for watch in watches]
    within = [s for s in stopped if s is not None and s < pause_s]
    if len(within) == len(watches):
        shown = ", ".join(f"{s:.1f}" for s in within)
        return f"no: stopped {shown} s into the pause"
    return f"**yes**, {len(watches) - len(within)} of {len(watches)}: it ran on"


def _overlaps(tool: Tool, watches: list[Watch]) -> str:
    if tool.coordinator is None:
        return tool.no_pause
    pause_s = PAUSE_LEASES * LEASE_S
    parts = []
    for watch in watches:
        started = watch.after_s(watch.started_ns)
        if started is None:
            parts.append(f"no takeover within {tool.takeover_within_s:g} s")
        elif watch.overlap:
            parts.append(f"**yes**, {started - pause_s:.2f} s after SIGCONT")
        else:
            parts.append(f"no (started {started - pause_s:.2f} s after SIGCONT)")
    return "; ".join(parts)


# --- helpers --------------------------------------------------------------------


def _poll(
    condition: Callable[[], bool], waiter: subprocess.Popen[str], what: str
) -> None:
    """Return once ``condition()`` holds; fail if the waiter ends or time runs out."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while not condition():
        if waiter.poll() is not None:
            raise RuntimeError(f"the waiter for {what} ended: {waiter.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no waiter for {what} within {LINE_TIMEOUT_S}s")
        time.sleep(WAIT_POLL_S)


def _readable(stream: IO[str], timeout_s: float) -> bool:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return bool(ready)


def _lock(figure: str) -> str:
    """A lock name of its own: no run sees another's leftovers."""
    return f"bench-peers-{figure}-{uuid.uuid4().hex[:8]}"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
