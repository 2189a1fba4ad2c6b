"""Statements: what leaderrun sends, counted by ``pg_stat_statements``.

One run (acquire, renewals, release), and its round trips on the wire
(``bench.wire``); idle waiters over a few lease periods (their baseline: polling
every 2 s, as Kubernetes' leader election does); and one hand-off among those
waiters, which wakes the head of the queue alone.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import admin, leaderrun_argv, let_go, start_holder, stop, wait_for
from bench.report import Goal, Results, verdict
from bench.wire import counting

EACH = Goal("each", 1, "==")
"""Statements per acquire, per renewal and per release."""

IDLE = Goal("", 1, "about", slack=0.5)
"""Acquire statements per idle waiter per lease period; where in its lease each
waiter's retry falls moves the figure, hence the slack."""

PER_HANDOFF = Goal("", 1, "==", unit="statement")
"""Acquire statements at one hand-off, whatever the number of waiters."""

ROUND_TRIPS = Goal("round trips", 1, "==", unit="per statement")
"""On the wire: each statement one round trip, the settings check included."""

IDLE_LEASE_S = 5.0
IDLE_PERIODS = 4
WAITERS = 4
KUBERNETES_RETRY_S = 2.0

KINDS = ("acquire", "renew", "release", "leave", "listen", "connect check", "other")


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
    """One holder: its acquire, its renewals and its release; and its round trips."""
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
        f"{calls['release']}; settings reads {calls['connect check']} (in the "
        f"acquire); other {calls['other']}",
        "-",
        str(EACH),
        # A statement of none of these kinds would be a cost the figure misses.
        verdict(
            EACH.met(calls["acquire"], per_renewal, calls["release"])
            and calls["connect check"] == 0
            and calls["other"] == 0
        ),
    )
    round_trips(dsn, out)


def round_trips(dsn: str, out: Results) -> None:
    """``leaderrun -- true`` through a counting proxy: every flight it sends."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    port = int(params.get("port") or 5432)
    with counting(host, port) as counter:
        subprocess.run(
            leaderrun_argv(
                make_conninfo(dsn, host="127.0.0.1", port=str(counter.port)),
                f"bench-wire-{uuid.uuid4().hex[:6]}",
                "--",
                "true",
            ),
            capture_output=True,
            timeout=120,
            check=True,
        )
    [connection] = counter.connections  # one connection, or the figure is wrong
    flights = connection.flights
    statements = flights.count("statement")
    answered = connection.round_trips()
    setup = answered - statements
    out.add(
        "round trips of a one-shot run, `leaderrun -- true` (on the wire)",
        f"{answered}: connect {setup} ({', '.join(flights[:setup])}), acquire 1, "
        f"release 1; then {', '.join(flights[answered:]) or 'nothing'} unanswered",
        "-",
        str(ROUND_TRIPS),
        verdict(statements == 2 and answered == setup + statements),
    )
    out.notes.append(
        "Round trips: TCP's handshake comes before them; `connect` counts what "
        "libpq sends before the first statement: an SSLRequest first under the "
        "default sslmode=prefer (the bench server has no TLS, so it answers N), "
        "then the startup packet (trust authentication here; SCRAM adds two)."
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
            wait_for(waiter.stderr, "retrying in")
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
        f"{handoff['acquire']} (the head of the queue; the others sleep on)",
        f"every waiter woken: {WAITERS}",
        PER_HANDOFF,
        handoff["acquire"],
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
    if "INSERT INTO" in query and "ON CONFLICT" in query:
        return "acquire"  # both forms; the settings check rides on it
    if "current_setting(" in query:
        return "connect check"  # a settings read of its own: there should be none
    if query.startswith("LISTEN"):
        return "listen"
    if "gone AS" in query:
        return "leave"
    if "pg_notify" in query:
        return "release"
    if query.lstrip().startswith("UPDATE") and "renewed_at = now()" in query:
        return "renew"
    return "other"


def reset_statements(dsn: str) -> None:
    """Forget the statements counted so far."""
    with admin(dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
