"""Hand-off between real leaderrun processes: woken by the release, or at expiry.

The holder's lease here is 30 s, so a waiter that merely slept until the
holder's expiry would start about 30 s after it; one woken by the release
notification starts at once. The bounds below sit far between the two, so they
test which path ran, not how fast the machine is. Waiters are served in the
order they came, each woken once, for its own turn, on its one connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import TupleRow

from tests.acceptance.conftest import (
    FAST,
    Leaderrun,
    child,
    read_rest,
    wait_for_line,
)

# NOTIFY is PostgreSQL's: a SQLite waiter sleeps until the expiry, as it always did.
pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.stores("postgres")]

Admin = Callable[[], psycopg.Connection[TupleRow]]

LEASE = ("--lease-duration", "30s")
NOTIFIED_WITHIN_S = 10.0
"""A waiter woken by the release starts well within this; one polling, at ~30 s."""
RUN_TIMEOUT_S = 60.0


def intervals(events: Path) -> list[tuple[int, float, float]]:
    """(token, start, stop) of every child that wrote to ``events``, by token."""
    starts: dict[int, float] = {}
    stops: dict[int, float] = {}
    for line in events.read_text().splitlines():
        what, token, _pid, stamp = line.split()
        (starts if what == "start" else stops)[int(token)] = float(stamp)
    assert starts.keys() == stops.keys(), events.read_text()
    return sorted((token, starts[token], stops[token]) for token in starts)


def hand_off(
    leaderrun: Leaderrun,
    events: Path,
    hold_s: str,
    holder: tuple[str, ...],
    waiter: tuple[str, ...],
) -> tuple[float, str]:
    """A holder (options ``holder``) runs ``hold_s``, a waiter (``waiter``) follows.

    Both must exit 0; returns the gap from the holder's child's stop to the
    waiter's child's start, and the waiter's log.
    """
    first = leaderrun.start(
        *holder, "--", *child("--events", str(events), "--exit-after", hold_s)
    )
    wait_for_line(first.stdout, "ready")
    second = leaderrun.start(
        *waiter, "--", *child("--events", str(events), "--exit-after", "0")
    )
    assert second.wait(timeout=RUN_TIMEOUT_S) == 0
    assert first.wait(timeout=RUN_TIMEOUT_S) == 0
    assert second.stderr is not None
    (_, _, held_until), (_, waited_from, _) = intervals(events)
    return waited_from - held_until, read_rest(second.stderr)


def test_a_waiter_starts_when_the_holder_releases_not_at_expiry(leaderrun, tmp_path):
    gap_s, log = hand_off(
        leaderrun, tmp_path / "events", "1.5", LEASE, (*LEASE, "--wait", "-vv")
    )
    assert 0 <= gap_s < NOTIFIED_WITHIN_S
    assert "listening for the release of" in log
    assert "was released; trying now" in log


def test_waiters_are_served_in_arrival_order_each_woken_once(
    leaderrun, tmp_path, pg_admin: Admin
):
    """A fair queue: the k-th to come runs k-th, woken once, on one connection."""
    events = tmp_path / "events"
    holder = leaderrun.start(
        *LEASE, "--", *child("--events", str(events), "--exit-after", "3")
    )
    wait_for_line(holder.stdout, "ready")
    waiters = []
    logs = []
    for _ in range(3):
        # One at a time, so that the order of their first attempts is known.
        waiters.append(
            leaderrun.start(
                *LEASE,
                "--wait",
                "-vv",
                "--",
                *child("--events", str(events), "--exit-after", "0.3"),
            )
        )
        logs.append("".join(wait_for_line(waiters[-1].stderr, "retrying in")))
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = 'leaderrun' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row == (4,)  # the holder's and one per waiter: LISTEN on the same
    assert [w.wait(timeout=RUN_TIMEOUT_S) for w in waiters] == [0, 0, 0]
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    runs = intervals(events)
    assert len(runs) == 4
    for (_, _, before), (_, after, _) in itertools.pairwise(runs):
        assert 0 <= after - before < NOTIFIED_WITHIN_S
    tokens = []
    for proc, early in zip(waiters, logs, strict=True):
        log = early + read_rest(proc.stderr)
        tokens.append(int(log.split("fencing token ")[1].split(")")[0]))
        # Woken once, for its own turn: one acquire statement per hand-off.
        assert log.count("was released; trying now") == 1, log
    first_token = runs[0][0]
    assert tokens == [first_token + 1, first_token + 2, first_token + 3]


def test_an_unreachable_listen_dsn_falls_back_to_the_expiry_without_failing(
    leaderrun, tmp_path
):
    """--listen-dsn that cannot connect: the waiter says so and polls the expiry."""
    unreachable = ("--listen-dsn", "host=127.0.0.1 port=1 connect_timeout=2")
    gap_s, log = hand_off(
        leaderrun, tmp_path / "events", "1", FAST, ("--wait", *unreachable)
    )
    assert "waiting without notifications for now" in log
    assert "127.0.0.1" in log
    assert gap_s >= 0


def test_a_listen_dsn_waiter_is_woken_on_its_own_connection(
    leaderrun, tmp_path, pg_dsn
):
    """--listen-dsn to the server itself: woken by the release, not the expiry."""
    gap_s, log = hand_off(
        leaderrun,
        tmp_path / "events",
        "1",
        LEASE,
        (*LEASE, "--wait", "-vv", "--listen-dsn", pg_dsn),
    )
    assert "on --listen-dsn" in log
    assert "was released; trying now" in log
    assert 0 <= gap_s < NOTIFIED_WITHIN_S


def test_a_waiter_that_gives_up_leaves_the_queue(leaderrun, tmp_path, pg_admin: Admin):
    """--wait-timeout passed: exit 75, and its place is gone, so nobody waits for it."""
    holder = leaderrun.start(*LEASE, "--", *child("--exit-after", "30"))
    wait_for_line(holder.stdout, "ready")
    waiter = leaderrun.start(*LEASE, "--wait-timeout", "1s", "--", "true")
    assert waiter.wait(timeout=RUN_TIMEOUT_S) == 75
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT waiters FROM leader_lease WHERE lock_name = %s",
            (leaderrun.lock,),
        ).fetchone()
    assert row is not None
    assert row[0] == []  # placed by its first attempt, gone when it gave up
