"""Hand-off behind PgBouncer in transaction mode: with ``--listen-dsn``, and without.

Leases go through PgBouncer (transaction pooling), where a waiter's LISTEN on
its pooled connection is never heard: it then sleeps until the holder's lease
ends, the documented fallback (the baseline here, with a short lease). With
``--listen-dsn`` naming the server itself, it LISTENs there and is woken by
the release, as without PgBouncer. Skipped, saying why, where pgbouncer is not
installed or the server is not the bench's own.
"""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from bench.handoff import handoff
from bench.report import Goal, Results
from bench.stamp import Stamper, StamperError

WOKEN = Goal("median", 50, "<", "ms")
"""The hand-off through PgBouncer with --listen-dsn."""

FALLBACK_LEASE_S = 4.0


def run(dsn: str, rounds: int, stamper: Stamper, out: Results) -> None:
    """``rounds`` hand-offs through PgBouncer with --listen-dsn, a few without."""
    from tests.pg import ClusterError
    from tests.production.cluster import PgBouncer, pgbouncer_binary

    try:
        stamper.path  # noqa: B018 (built now, so that a missing compiler is one note)
    except StamperError as exc:
        out.notes.append(f"PgBouncer hand-off not measured: {exc}")
        return
    if pgbouncer_binary() is None:
        out.notes.append("PgBouncer hand-off not measured: pgbouncer is not installed.")
        return
    params = conninfo_to_dict(dsn)
    bouncer = PgBouncer(str(params["host"]), int(str(params["port"])), "transaction")
    try:
        bouncer.start()
    except ClusterError as exc:
        out.notes.append(f"PgBouncer hand-off not measured: {exc}")
        return
    print(f"hand-off through PgBouncer: {rounds} rounds with --listen-dsn")
    try:
        pooled = bouncer.dsn(user=str(params.get("user") or "postgres"))
        listen = ("--listen-dsn", dsn)
        listened = [
            handoff(pooled, pooled, f"bench-bouncer-{i}", "30s", stamper, listen)
            for i in range(rounds)
        ]
        lease = f"{FALLBACK_LEASE_S:g}s"
        fallback = [
            handoff(pooled, pooled, f"bench-bouncer-poll-{i}", lease, stamper)
            for i in range(2)
        ]
    finally:
        bouncer.stop()
    woken_ms = sorted(done.latency_s * 1000 for done in listened)
    median_ms = woken_ms[len(woken_ms) // 2]
    slept = [done.latency_s * 1000 for done in fallback]
    out.check(
        "hand-off through PgBouncer (transaction mode), leases and waiter pooled, "
        f"--listen-dsn to the server (median of {rounds})",
        f"{median_ms:.1f} ms (min {woken_ms[0]:.1f}, max {woken_ms[-1]:.1f})",
        f"without --listen-dsn: {min(slept):.0f}-{max(slept):.0f} ms (lease "
        f"{FALLBACK_LEASE_S:g} s: the waiter sleeps until the holder's expiry)",
        WOKEN,
        median_ms,
    )
