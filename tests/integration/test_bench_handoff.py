"""The hand-off's baselines (bench/handoff_baseline.py) against the real server.

The bench measures leaderrun's hand-off beside two minimal Python programs that
hand a lease on: with leaderrun's statements, and with the smallest ones. Each
must really be woken by the release (a waiter that is not woken takes the lock
only after its 60 s wait for a notification), hand the lock on, and leave no
table behind.
"""

import pytest

from bench.baseline_script import FLOOR_TABLE, drop_floor
from bench.handoff import baseline_handoff
from leaderrun.stores.postgres import PostgresLeaseStore

WOKEN_WITHIN_S = 5.0
"""Far above a hand-off (milliseconds), far below the waiter's 60 s fallback."""


@pytest.mark.parametrize("smallest", [False, True], ids=["leaderrun-sql", "smallest"])
def test_a_baseline_waiter_is_woken_by_the_release(pg_dsn, pg_admin, stamper, smallest):
    """The waiter's command starts after the holder's ended, woken by the release."""
    PostgresLeaseStore(pg_dsn).init()
    try:
        latency_s = baseline_handoff(pg_dsn, stamper, smallest=smallest)
    finally:
        drop_floor(pg_dsn)
    assert 0 < latency_s < WOKEN_WITHIN_S
    with pg_admin() as conn:
        left = conn.execute("SELECT to_regclass(%s)", (FLOOR_TABLE,)).fetchone()
    assert left == (None,)
