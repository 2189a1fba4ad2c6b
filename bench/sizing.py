"""Sizing: the server's CPU for each thing leaderrun asks of it.

On the bench's own server (its CPU is read from /proc, the postmaster's and
every backend's), each operation is repeated on one session the way leaderrun
runs it (``leaderrun.stores.postgres``), and the server CPU it cost is divided
by the count: a new connection (leaderrun opens one per run), an acquire that
is granted plus its release, a refused acquire (skip mode), a queued one that
keeps its place (``--wait``), a renewal. docs/sizing.md turns these into a
fleet's load. Skipped with a reason on a server given with ``--dsn``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.report import Results
from bench.scale import server_cpu_s
from leaderrun.holding import make_claim
from leaderrun.lease import parse_lock_id
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.stores.postgres import PostgresLeaseStore

if TYPE_CHECKING:
    from tests.pg import LocalPgCluster

LEASE_S = 30.0


def run(dsn: str, cluster: LocalPgCluster | None, count: int, out: Results) -> None:
    """Each operation ``count`` times; server CPU per operation, in ms."""
    if cluster is None:
        out.notes.append("Sizing not measured: the server's CPU is read from /proc.")
        return
    print(f"sizing: server CPU of each operation, {count} times each")
    store = PostgresLeaseStore(dsn)
    lock = parse_lock_id(f"bench-size-{uuid.uuid4().hex[:6]}")
    holder = store.connect()
    other = store.connect()
    try:

        def connection() -> None:
            store.connect().close()

        def granted() -> None:
            claim = make_claim("bench", "job")
            result = other.acquire(lock, claim, LEASE_S, history_keep=100)
            assert result.lease is not None
            other.release(result.lease, RunEnd(RunOutcome.ok, 0))

        cost = {"connection (open, close)": measure(cluster, connection, count)}
        cost["acquire granted + release, with history"] = measure(
            cluster, granted, count
        )
        held = holder.acquire(lock, make_claim("bench", "job"), LEASE_S).lease
        assert held is not None
        skipper = make_claim("bench", "job")
        waiter = make_claim("bench", "job")
        cost["acquire refused (skip mode)"] = measure(
            cluster, lambda: other.acquire(lock, skipper, LEASE_S), count
        )
        cost["acquire refused, queued (--wait: keeps its place)"] = measure(
            cluster, lambda: other.acquire(lock, waiter, LEASE_S, queued=True), count
        )
        cost["renewal"] = measure(cluster, lambda: holder.renew(held, LEASE_S), count)
        holder.release(held)
    finally:
        holder.close()
        other.close()
    out.add(
        f"server CPU per operation (median server, {count} each)",
        "; ".join(f"{what} {ms:.2f} ms" for what, ms in cost.items()),
        "-",
    )


def measure(
    cluster: LocalPgCluster, operation: Callable[[], object], count: int
) -> float:
    """Server CPU milliseconds per call of ``operation``."""
    operation()  # warm: the first call plans and caches
    before = server_cpu_s(cluster)
    for _ in range(count):
        operation()
    time.sleep(0.05)  # the last backends' exit is counted with their parent
    after = server_cpu_s(cluster)
    assert before is not None
    assert after is not None
    return (after - before) * 1000 / count
