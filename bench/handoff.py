"""Hand-off: from the holder's child exiting to the waiter's child starting.

Both children are the stamper (bench/stamp.c): the holder's prints the time as
it exits, the waiter's as it starts. :func:`stamped_handoff` measures one
hand-off for any lock tool; the peers figure (bench/peers.py) uses it too.

The baselines, measured in the same rounds with the same stamper: the least a
Python program must do to hand a lock on (bench/handoff_baseline.py), with
leaderrun's statements; with the smallest statements a lease in a row can be
handed on with, the release granting it (the floor of a lease on PostgreSQL
here); and with a session advisory lock, the fastest hand-off PostgreSQL has
(a design leaderrun rules out). Further baselines are the peers' hand-offs
(the peers table: etcdctl lock and flock), and a waiter that hears no
notification, which sleeps until the holder's lease ends (the PgBouncer row:
bench/pgbouncer.py).
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from bench.baseline_script import (
    HANDOFF_KINDS,
    drop_floor,
    handoff_argv,
    handoff_spec,
)
from bench.common import (
    LINE_TIMEOUT_S,
    admin,
    leaderrun_argv,
    median_ms,
    read_ns,
    start_job,
    stop,
    wait_for,
)
from bench.report import Goal, Results
from bench.stamp import Stamper, StamperError

MEDIAN = Goal("median", 5, "<=", "ms")
"""The hand-off with notifications, in milliseconds (issue 18: etcd's speed)."""

FIGURE = "hand-off: holder's child exits -> waiter's child starts"
"""The row's name in RESULTS.md."""

SETTLE_S = 0.3
"""The pause between the waiter's waiting and the end of the holder's job."""


def run(dsn: str, rounds: int, stamper: Stamper, out: Results) -> None:
    """Hand-offs woken by the release, ``rounds`` of them, and the baselines'."""
    print(f"hand-off: {rounds} rounds, each with its three baselines")
    try:
        stamper.path  # noqa: B018 (built now, so that a missing compiler is one row)
    except StamperError as exc:
        out.add(FIGURE, f"not measured: {exc}", "-")
        return
    notified: list[float] = []
    baselines: dict[str, list[float]] = {kind: [] for kind in HANDOFF_KINDS}
    try:
        for i in range(rounds):
            done = handoff(dsn, dsn, f"bench-handoff-{i}", "30s", stamper)
            if "was released; trying now" not in done.log:
                raise RuntimeError(f"the waiter was not woken by a release: {done.log}")
            notified.append(done.latency_s)
            for kind, latencies in baselines.items():
                latencies.append(baseline_handoff(dsn, stamper, kind))
    finally:
        drop_floor(dsn)
    out.check(
        f"{FIGURE} (median of {rounds})",
        f"{_spread(notified)}",
        "Python, no safety (bench/handoff_baseline.py): leaderrun's statements "
        f"{_spread(baselines['leaderrun'])}; a lease's smallest statements, the "
        f"release granting it {_spread(baselines['smallest'])}; a session "
        f"advisory lock {_spread(baselines['session'])}; etcdctl lock, flock: "
        "the peers table; no notification heard: the PgBouncer row",
        MEDIAN,
        median_ms(notified),
    )


def _spread(latencies_s: list[float]) -> str:
    return (
        f"{median_ms(latencies_s):.1f} ms (min {min(latencies_s) * 1000:.1f}, "
        f"max {max(latencies_s) * 1000:.1f})"
    )


def baseline_handoff(dsn: str, stamper: Stamper, kind: str) -> float:
    """One hand-off between two handoff_baseline.py processes, in seconds.

    ``kind`` is one of ``HANDOFF_KINDS`` (``baseline_script.handoff_spec``).
    """
    key = random.randrange(1, 2**62)
    spec = handoff_spec(dsn, key, kind)

    def waiting(waiter: subprocess.Popen[str]) -> str:
        said = wait_for(_stderr(waiter), "waiting")
        if kind == "session":  # said before its statement: wait for its lock wait
            _lock_waited_for(dsn)
        return said

    try:
        return stamped_handoff(
            handoff_argv(dsn, spec, key, "hold"),
            handoff_argv(dsn, spec, key, "wait"),
            stamper,
            waiting=waiting,
        ).latency_s
    finally:
        spec.unlink()


def _lock_waited_for(dsn: str) -> None:
    """Return once the baseline's waiter waits in the server for its lock."""
    deadline_s = time.monotonic() + LINE_TIMEOUT_S
    with admin(dsn) as conn:
        while time.monotonic() < deadline_s:
            waits = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE a.application_name = 'bench-handoff-wait' AND NOT l.granted"
            ).fetchone()
            if waits is not None and waits[0]:
                return
            time.sleep(0.005)
    raise RuntimeError("the baseline's waiter never waited for its lock")


def handoff(
    dsn: str,
    waiter_dsn: str,
    lock: str,
    lease: str,
    stamper: Stamper,
    waiter_args: tuple[str, ...] = (),
) -> Handoff:
    """One leaderrun hand-off; the waiter uses ``--wait`` and ``waiter_dsn``.

    ``waiter_args`` are more options for the waiter (``--listen-dsn``).
    """
    return stamped_handoff(
        leaderrun_argv(dsn, lock, "--lease-duration", lease, "--"),
        leaderrun_argv(waiter_dsn, lock, "--wait", "-vv", *waiter_args, "--"),
        stamper,
        # -vv says when the waiter found the lock held: it waits from then on.
        waiting=lambda waiter: wait_for(_stderr(waiter), "is held; retrying"),
    )


@dataclass(frozen=True)
class Handoff:
    """One hand-off: the holder's child's end to the waiter's child's start."""

    latency_s: float
    log: str
    """The waiter's stderr."""


def stamped_handoff(
    holder: list[str],
    waiter: list[str],
    stamper: Stamper,
    waiting: Callable[[subprocess.Popen[str]], str],
    env: dict[str, str] | None = None,
) -> Handoff:
    """One hand-off between two lock tools' processes, stamped at both ends.

    ``holder`` and ``waiter`` are a tool's argv up to its command; the stamper
    is appended. ``waiting(waiter)`` returns once the waiter waits for the lock
    (with what it read of the waiter's stderr); only then does the holder's
    job end, so the figure never includes the waiter's own start-up.
    """
    held, job = start_job(holder, stamper, env)
    second = None
    try:
        second = subprocess.Popen(
            [*waiter, *stamper.start()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        early = waiting(second)
        # The waiter asleep, the previous round's processes and server backends
        # gone: the hand-off alone is timed, not the end of what came before.
        time.sleep(SETTLE_S)
        job.end()
        assert held.stdout is not None
        assert second.stdout is not None
        ended_ns = read_ns(held.stdout, "the holder's job's end")
        started_ns = read_ns(second.stdout, "the waiter's child's start")
        _, log = second.communicate(timeout=LINE_TIMEOUT_S)
        if second.returncode != 0 or held.wait(timeout=LINE_TIMEOUT_S) != 0:
            raise RuntimeError(
                f"hand-off failed: holder {held.returncode}, "
                f"waiter {second.returncode}: {early}{log}"
            )
        return Handoff((started_ns - ended_ns) / 1e9, early + log)
    finally:
        job.kill()
        stop(held)
        if second is not None:
            stop(second)


def _stderr(proc: subprocess.Popen[str]) -> IO[str]:
    assert proc.stderr is not None
    return proc.stderr
