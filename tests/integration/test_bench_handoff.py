"""The hand-off's baselines (bench/handoff_baseline.py) against the real server.

The bench measures leaderrun's hand-off beside minimal Python programs that
hand a lock on: a lease with leaderrun's statements, a lease with the smallest
ones, a session advisory lock. Each waiter must really be woken by the release
(a lease's waiter that hears nothing takes the lock only after its 60 s wait
for a notification), and the bench leaves no table behind.
"""

import pytest

from bench.baseline_script import FLOOR_TABLE, HANDOFF_KINDS, drop_floor
from bench.handoff import baseline_handoff
from leaderrun.stores.postgres import PostgresLeaseStore

WOKEN_WITHIN_S = 5.0
"""Far above a hand-off (milliseconds), far below the waiter's 60 s fallback."""


@pytest.mark.parametrize("kind", HANDOFF_KINDS)
def test_a_baseline_waiter_is_woken_by_the_release(pg_dsn, pg_admin, stamper, kind):
    """The waiter's command starts after the holder's ended, woken by the release."""
    PostgresLeaseStore(pg_dsn).init()
    try:
        latency_s = baseline_handoff(pg_dsn, stamper, kind)
    finally:
        drop_floor(pg_dsn)
    assert 0 < latency_s < WOKEN_WITHIN_S
    with pg_admin() as conn:
        left = conn.execute("SELECT to_regclass(%s)", (FLOOR_TABLE,)).fetchone()
    assert left == (None,)
