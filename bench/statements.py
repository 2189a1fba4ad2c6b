"""Statements: what leaderrun sends, counted by ``pg_stat_statements``.

One run (acquire, renewals, release); idle waiters over a few lease periods
(their baseline: polling every 2 s, as Kubernetes' leader election does); and
one hand-off among those waiters.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import psycopg

from bench.common import admin, leaderrun_argv, let_go, start_holder, stop, wait_for
from bench.report import Goal, Results, verdict

EACH = Goal("each", 1, "==")
"""Statements per acquire, per renewal and per release."""

IDLE = Goal("", 1, "about", slack=0.5)
"""Acquire statements per idle waiter per lease period; where in its lease each
waiter's retry falls moves the figure, hence the slack."""

PER_WAITER = Goal("", 1, unit="per waiter")
"""Acquire statements per waiter at one hand-off."""

IDLE_LEASE_S = 5.0
IDLE_PERIODS = 4
WAITERS = 4
KUBERNETES_RETRY_S = 2.0

KINDS = ("acquire", "renew", "release", "listen", "connect check", "other")


def run(dsn: str, out: Results) -> None:
    """Count one run's statements, then idle waiters' and one hand-off's."""
    print("database cost: pg_stat_statements")
    try:
        with admin(dsn) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT count(*) FROM pg_stat_statements")
    except psycopg.Error as exc:
        out.notes.append(f"Statement counts not measured: {exc}".strip())
        return
    one_run(dsn, out)
    waiters(dsn, out)


def one_run(dsn: str, out: Results) -> None:
    """One holder: its acquire, its renewals and its release."""
    reset_statements(dsn)
    lock = f"bench-stmt-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [
            *leaderrun_argv(dsn, lock, "--lease-duration", "4s", "-vv"),
            "--",
            "sleep",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    renewals = done.stderr.count("renewed ")
    calls = statement_calls(dsn)
    per_renewal = calls["renew"] / max(renewals, 1)
    out.add(
        "statements per acquire / renewal / release (one run, "
        f"{renewals} renewals logged)",
        f"{calls['acquire']} / {per_renewal:.2f} / "
        f"{calls['release']}; plus {calls['connect check']} settings read per "
        f"connection; other {calls['other']}",
        "-",
        str(EACH),
        # A statement of none of these kinds would be a cost the figure misses.
        verdict(
            EACH.met(calls["acquire"], per_renewal, calls["release"])
            and calls["other"] == 0
        ),
    )


def waiters(dsn: str, out: Results) -> None:
    """Idle waiters over a few lease periods, then the first hand-off among them."""
    lock = f"bench-idle-{uuid.uuid4().hex[:6]}"
    holder = start_holder(dsn, lock, f"{IDLE_LEASE_S:g}s", "read x")
    started: list[subprocess.Popen[str]] = []
    try:
        for _ in range(WAITERS):
            started.append(
                subprocess.Popen(
                    leaderrun_argv(
                        dsn, lock, "--wait", "-vv", "--", "sh", "-c", "sleep 0.2"
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for waiter in started:
            assert waiter.stderr is not None
            wait_for(waiter.stderr, "is held; retrying")
        reset_statements(dsn)
        time.sleep(IDLE_LEASE_S * IDLE_PERIODS)
        idle = statement_calls(dsn)
        reset_statements(dsn)
        let_go(holder)
        holder.wait(timeout=60)
        time.sleep(0.1)  # the winner's child runs 0.2 s: catch the first hand-off only
        handoff = statement_calls(dsn)
    finally:
        for waiter in started:
            stop(waiter)
        stop(holder)
    per_waiter = idle["acquire"] / WAITERS / IDLE_PERIODS
    out.check(
        f"statements per idle waiter per lease period ({WAITERS} waiters, "
        f"{IDLE_PERIODS} periods of {IDLE_LEASE_S:g} s)",
        f"{per_waiter:.2f} (LISTEN {idle['listen']}, other {idle['other']})",
        f"polling every {KUBERNETES_RETRY_S:g} s (Kubernetes): "
        f"{IDLE_LEASE_S / KUBERNETES_RETRY_S:.1f}",
        IDLE,
        per_waiter,
    )
    out.check(
        f"acquire statements at one hand-off, {WAITERS} waiters",
        f"{handoff['acquire']} ({handoff['acquire'] / WAITERS:.2f} per waiter)",
        "-",
        PER_WAITER,
        handoff["acquire"] / WAITERS,
    )


def statement_calls(dsn: str) -> dict[str, int]:
    """pg_stat_statements calls on leader_lease and LISTEN, by kind."""
    kinds = dict.fromkeys(KINDS, 0)
    with admin(dsn) as conn:
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements "
            "WHERE query LIKE '%%leader_lease%%' OR query LIKE 'LISTEN%%' "
            "OR query LIKE '%%current_setting(%%'"
        ).fetchall()
    for query, calls in rows:
        kinds[kind_of(query)] += calls
    return kinds


def kind_of(query: str) -> str:
    """Which of :data:`KINDS` a statement is, as pg_stat_statements normalised it."""
    if "current_setting(" in query:
        # Each new lease connection reads synchronous_commit once.
        return "connect check"
    if query.startswith("LISTEN"):
        return "listen"
    if "INSERT INTO" in query and "ON CONFLICT" in query:
        return "acquire"
    if "pg_notify" in query:
        return "release"
    if query.lstrip().startswith("UPDATE") and "renewed_at = now()" in query:
        return "renew"
    return "other"


def reset_statements(dsn: str) -> None:
    """Forget the statements counted so far."""
    with admin(dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
