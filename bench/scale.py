"""Scale: many ``leaderrun --wait`` processes over a few locks, for a while.

Each exited process is replaced until the time is up, then the rest drain. Every
job stamps its start and stop with its fencing token in its lock's events file;
afterwards no two jobs of a lock may overlap and their tokens must increase in
start order (the fault suite's property, :mod:`tests.helpers.intervals`), and no
leaderrun may fail. Meanwhile a sampler counts leaderrun's connections and reads
each live process's peak RSS, which is compared with the baseline script's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.baseline_script import BaselineScript
from bench.common import Finished, admin, leaderrun_argv, vm_hwm_kb
from bench.report import Goal, Results, verdict
from tests.helpers.intervals import NOT_ENDED, find_overlaps

if TYPE_CHECKING:
    from tests.pg import LocalPgCluster

NO_OVERLAP = Goal("overlap", 0, "==")
NO_ERRORS = Goal("errors", 0, "==")
RSS_RATIO = Goal("", 1.2, unit="x")
"""A leaderrun's peak RSS against the baseline script's."""
ONE_CONNECTION = Goal("", 1.0, unit="per process")
"""Holders and waiters alike: a waiter LISTENs on its lease connection."""

SAMPLE_EVERY_S = 1.0

# $0 is the lock's events file; each line: start|stop, token, nanoseconds.
JOB = (
    'echo start $LEADERRUN_FENCING_TOKEN $(date +%s%N) >> "$0"; '
    "sleep {job_s:g}; "
    'echo stop $LEADERRUN_FENCING_TOKEN $(date +%s%N) >> "$0"'
)


def run(
    dsn: str,
    cluster: LocalPgCluster | None,
    procs: int,
    locks: int,
    seconds: float,
    job_s: float,
    baseline: BaselineScript,
    out: Results,
) -> None:
    """Run the processes, check the locks' jobs, and report the run."""
    print(
        f"scale: {procs} processes, {locks} locks, {seconds:g} s, jobs of {job_s:g} s"
    )
    baseline_rss = baseline.peak_rss_kb()  # before the load; once in the bench run
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        fleet = Fleet(dsn, work, procs, locks, job_s)
        with Sampler(dsn, fleet.pids) as sampler:
            cpu_before = server_cpu_s(cluster)
            wall_s = fleet.run(seconds)
            cpu_after = server_cpu_s(cluster)
        jobs, overlaps = fleet.check_jobs()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    errors = fleet.errors
    out.add(
        f"scale: {procs} processes over {locks} locks, {wall_s:.0f} s, "
        f"{jobs} jobs of {job_s:g} s",
        f"overlaps {overlaps}, errors {len(errors)}",
        "-",
        f"{NO_OVERLAP}, {NO_ERRORS}",
        verdict(NO_OVERLAP.met(overlaps) and NO_ERRORS.met(len(errors))),
    )
    connections = sampler.connections
    per_process = max(connections) / procs
    out.check(
        "scale: connections used (leaderrun's, sampled each second)",
        f"max {max(connections)}, median {statistics.median(connections):.0f}: "
        f"{per_process:.2f} per process",
        f"leaderrun processes alive: median {statistics.median(sampler.alive):.0f}",
        ONE_CONNECTION,
        per_process,
    )
    if cpu_before is not None and cpu_after is not None:
        server = cpu_after - cpu_before
        out.add(
            "scale: server CPU",
            f"{server:.1f} s over {wall_s:.0f} s = {server / wall_s:.2f} cores; "
            f"{server / max(jobs, 1) * 1000:.1f} ms per job",
            "-",
        )
    rss = list(sampler.peaks_kb.values())
    peak_rss = statistics.median(rss)
    out.check(
        f"scale: supervisor peak RSS (VmHWM, median of {len(rss)} processes)",
        f"{peak_rss / 1024:.1f} MiB (max {max(rss) / 1024:.1f})",
        f"minimal psycopg script {baseline_rss / 1024:.1f} MiB",
        RSS_RATIO,
        peak_rss / baseline_rss,
        shown=f"{peak_rss / baseline_rss:.2f}",
    )
    out.add(
        "scale: leaderrun CPU per run (median, user+sys)",
        f"{statistics.median(f.cpu_s for f in fleet.finished) * 1000:.0f} ms",
        "-",
    )
    if errors:
        out.notes.append("First errors: " + " | ".join(errors[:5]))


@dataclass
class Running:
    """A leaderrun of the fleet: its slot, its process, its stderr file, its start."""

    slot: int
    proc: subprocess.Popen[bytes]
    stderr: Path
    started_s: float


class Fleet:
    """``procs`` leaderruns in slots over ``locks`` locks; each ended one is replaced.

    ``slot % locks`` is a slot's lock. The main thread starts and reaps
    (:meth:`run`); a :class:`Sampler` thread reads :meth:`pids`.
    """

    def __init__(
        self, dsn: str, work: Path, procs: int, locks: int, job_s: float
    ) -> None:
        self.dsn = dsn
        self.work = work
        self.procs = procs
        self.locks = locks
        self.job = JOB.format(job_s=job_s)
        self.prefix = f"bench-scale-{uuid.uuid4().hex[:6]}"
        self.finished: list[Finished] = []
        self.errors: list[str] = []
        self._live: dict[int, Running] = {}
        self._guard = threading.Lock()

    def pids(self) -> list[int]:
        """The leaderruns running now."""
        with self._guard:
            return list(self._live)

    def run(self, seconds: float) -> float:
        """Fill the slots, replace each ended one for ``seconds``, drain; the wall s."""
        began = time.perf_counter()
        for slot in range(self.procs):
            self.start(slot)
        while self._live:
            ended = self.reap()
            if ended is not None and time.perf_counter() - began < seconds:
                self.start(ended.slot)
        return time.perf_counter() - began

    def start(self, slot: int) -> None:
        """Start a leaderrun in ``slot``, waiting for its lock to run the job."""
        lock = slot % self.locks
        stderr = self.work / f"err-{slot}-{time.monotonic_ns()}"
        with stderr.open("w") as err_file:
            proc = subprocess.Popen(
                [
                    *leaderrun_argv(self.dsn, f"{self.prefix}-{lock}", "--wait", "--"),
                    "sh",
                    "-c",
                    self.job,
                    str(self.events(lock)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        with self._guard:
            self._live[proc.pid] = Running(slot, proc, stderr, time.perf_counter())

    def reap(self) -> Running | None:
        """Wait for a child to end; record it if it is one of ours (else None)."""
        pid, status, usage = os.wait4(-1, 0)
        with self._guard:
            ended = self._live.pop(pid, None)
        if ended is None:
            return None
        code = os.waitstatus_to_exitcode(status)
        ended.proc.returncode = code
        self.finished.append(
            Finished(
                code,
                time.perf_counter() - ended.started_s,
                usage.ru_utime + usage.ru_stime,
            )
        )
        text = ended.stderr.read_text()
        if code != 0 or text:
            self.errors.append(f"status {code}: {text.strip()[:200]}")
        return ended

    def events(self, lock: int) -> Path:
        """The file where ``lock``'s jobs stamp their starts and stops."""
        return self.work / f"events-{lock}"

    def check_jobs(self) -> tuple[int, int]:
        """How many jobs ran, and how many overlaps or out-of-order tokens there were.

        A job that never stamped its stop is taken to run on forever.
        """
        jobs = overlaps = 0
        for lock in range(self.locks):
            if not self.events(lock).exists():
                continue
            spans = job_spans(self.events(lock).read_text())
            jobs += len(spans)
            overlaps += len(find_overlaps(spans))
            tokens = sorted(spans, key=lambda token: spans[token][0])
            if tokens != sorted(tokens):
                overlaps += 1
        return jobs, overlaps


def job_spans(events: str) -> dict[int, tuple[float, float]]:
    """Per fencing token, its job's start and stop stamps (ns) from an events file."""
    starts: dict[int, int] = {}
    stops: dict[int, int] = {}
    for line in events.splitlines():
        what, token, stamp = line.split()
        (starts if what == "start" else stops)[int(token)] = int(stamp)
    return {
        token: (start, stops.get(token, NOT_ENDED)) for token, start in starts.items()
    }


class Sampler:
    """Every second, on its own thread: leaderrun's connections and processes.

    For each sample: how many connections leaderrun has open, how many of the
    fleet's processes are alive, and each live one's peak RSS so far.
    """

    def __init__(self, dsn: str, pids: Callable[[], list[int]]) -> None:
        self.dsn = dsn
        self.pids = pids
        self.connections: list[int] = []
        self.alive: list[int] = []
        self.peaks_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with admin(self.dsn) as conn:
            while not self._stop.wait(SAMPLE_EVERY_S):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'leaderrun'"
                ).fetchone()
                assert row is not None
                self.connections.append(row[0])
                pids = self.pids()
                self.alive.append(len(pids))
                for pid in pids:
                    hwm = vm_hwm_kb(pid)
                    if hwm is not None:
                        self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), hwm)


def server_cpu_s(cluster: LocalPgCluster | None) -> float | None:
    """CPU seconds used so far by the local server, its exited and live backends."""
    if cluster is None:
        return None
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()

    total = sum(int(x) for x in fields(pid)[11:15])  # utime stime cutime cstime
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += sum(int(x) for x in fields(int(child))[11:13])
    return total / tick
