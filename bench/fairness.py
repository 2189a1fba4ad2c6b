"""Fairness: contenders served in the order they came, one statement per hand-off.

Two jobs (locks), three contenders each, every contender a loop: it runs
``leaderrun --wait``, whose child notes its fencing token and holder, and comes
again as soon as it is done, so the queue is never empty. A process's arrival
is the database's time of its first attempt: its place's stamp in the queue,
read from the lease row every few milliseconds while it waits (one that never
waited arrived when it was granted, its run's start). A queue jump is a pair
of runs where the later arrival got the earlier token; etcd's lock, measured
the same way from the client side, made none in 40 hand-offs.
``pg_stat_statements`` counts the acquire statements: one per arrival (it
carries the LISTEN) and, for a fair queue that wakes the head alone, one per
hand-off.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from dataclasses import dataclass

from bench.common import admin, leaderrun_argv
from bench.report import Goal, Results
from bench.statements import reset_statements, statement_calls

NO_JUMPS = Goal("queue jumps", 0, "==")
AT_MOST_ONE = Goal("", 1, unit="per hand-off")
"""A hand-off costs the head's statement; one to an arrival that found the lock
free costs none beyond the arrival's own."""

JOBS = 2
CONTENDERS = 3
JOB_S = 1.0
"""Longer than a contender's way back (a leaderrun start-up, on a busy machine
too), so that two are always waiting while the third runs."""
LEASE = "10s"
SAMPLE_EVERY_S = 0.005


@dataclass(frozen=True)
class Run:
    """One leaderrun process of a contender: its holder identity and token."""

    holder: str
    token: int


def run(dsn: str, handoffs: int, out: Results) -> None:
    """``handoffs`` hand-offs in all, shared by the jobs."""
    per_job = max(1, handoffs // JOBS)
    print(f"fairness: {JOBS} jobs x {CONTENDERS} contenders, {per_job} hand-offs each")
    locks = [f"bench-fair-{job}-{uuid.uuid4().hex[:6]}" for job in range(JOBS)]
    runs: list[list[Run]] = [[] for _ in range(JOBS)]
    reset_statements(dsn)
    with Arrivals(dsn, locks) as arrivals:
        threads = []
        for job, lock in enumerate(locks):
            remaining = [per_job + 1]  # runs: the first holder, then each hand-off
            guard = threading.Lock()
            threads += [
                threading.Thread(
                    target=_contend,
                    args=(dsn, lock, remaining, guard, runs[job]),
                    daemon=True,
                )
                for _ in range(CONTENDERS)
            ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=per_job * (JOB_S + 5) + 60)
    calls = statement_calls(dsn)
    done = sum(len(job_runs) for job_runs in runs)
    made = sum(max(0, len(job_runs) - 1) for job_runs in runs)
    jumps = [
        pair for job_runs in runs for pair in queue_jumps(job_runs, arrivals.of(dsn))
    ]
    for first, later in jumps:
        print(f"    jump: {first} came first, {later} was served first")
    # Every process started waits its turn and runs: one arrival each.
    per_handoff = (calls["acquire"] - done) / max(made, 1)
    out.check(
        f"fair queue: {JOBS} jobs x {CONTENDERS} contenders, {made} hand-offs",
        f"{len(jumps)} queue jumps ({arrivals.sampled} of {done} runs seen waiting)",
        "NOTIFY to every waiter, all racing (before): 7 of 40 to a later arrival",
        NO_JUMPS,
        len(jumps),
    )
    out.check(
        "acquire statements per hand-off (same run)",
        f"{per_handoff:.2f} ({calls['acquire']} in all: {done} at arrival, "
        f"LISTEN riding on it {calls['listen']})",
        f"every waiter woken: {CONTENDERS - 1} per hand-off",
        AT_MOST_ONE,
        per_handoff,
    )


def _contend(
    dsn: str,
    lock: str,
    remaining: list[int],
    guard: threading.Lock,
    runs: list[Run],
) -> None:
    """Come back for ``lock`` until its runs are done; note each run."""
    while True:
        with guard:
            if remaining[0] <= 0:
                return
        done = subprocess.run(
            leaderrun_argv(
                dsn,
                lock,
                "--wait",
                "--lease-duration",
                LEASE,
                "--",
                "sh",
                "-c",
                f'echo "$LEADERRUN_FENCING_TOKEN $LEADERRUN_HOLDER"; sleep {JOB_S}',
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"a contender failed: {done.stderr}")
        token, holder = done.stdout.split()
        with guard:
            remaining[0] -= 1
            runs.append(Run(holder, int(token)))


class Arrivals:
    """Every waiter's arrival (its place's stamp), read from the lease rows.

    Polled on a thread of its own every :data:`SAMPLE_EVERY_S`; a process seen
    in no sample never waited, and arrived when it was granted.
    """

    def __init__(self, dsn: str, locks: list[str]) -> None:
        self.dsn = dsn
        self.locks = locks
        self.queued_s: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def sampled(self) -> int:
        """How many processes were seen waiting."""
        return len(self.queued_s)

    def _poll(self) -> None:
        with admin(self.dsn) as conn:
            while not self._stop.wait(SAMPLE_EVERY_S):
                rows = conn.execute(
                    "SELECT p->>'w', (p->>'q')::float8 FROM leader_lease, "
                    "jsonb_array_elements(coalesce(waiters, '[]'::jsonb)) AS p "
                    "WHERE lock_name = ANY(%s)",
                    (self.locks,),
                ).fetchall()
                for holder, queued_s in rows:
                    self.queued_s.setdefault(holder, queued_s)

    def of(self, dsn: str) -> dict[str, float]:
        """Each run's arrival: its place's stamp, else its start (from history)."""
        with admin(dsn) as conn:
            rows = conn.execute(
                "SELECT holder, extract(epoch FROM started_at)::float8 FROM leader_run "
                "WHERE lock_name = ANY(%s)",
                (self.locks,),
            ).fetchall()
        return {holder: self.queued_s.get(holder, started) for holder, started in rows}


def queue_jumps(runs: list[Run], arrived: dict[str, float]) -> list[tuple[Run, Run]]:
    """Pairs (first, later) where ``later`` came after ``first`` but ran before."""
    return [
        (first, later)
        for first in runs
        for later in runs
        if arrived[later.holder] > arrived[first.holder] and later.token < first.token
    ]
