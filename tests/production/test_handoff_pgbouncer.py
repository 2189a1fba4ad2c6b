"""Hand-off behind PgBouncer in transaction mode: LISTEN is accepted, never heard.

PgBouncer runs the waiter's LISTEN on some pooled server connection and hands
that connection to other clients afterwards; the waiter's own connection may
never receive the release notification, and another client's may. The waiter
then falls back to sleeping until the holder's expiry: it takes over, without an
error, and no lease connection acts on a notification meant for a waiter.
"""

from __future__ import annotations

import pytest

from tests.acceptance.conftest import FAST, child, read_rest, readline

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]

RUN_TIMEOUT_S = 60.0


def test_a_waiter_behind_pgbouncer_falls_back_to_expiry_without_error(
    through_bouncer,
):
    holder = through_bouncer.start(*FAST, "--", *child("--exit-after", "1"))
    assert readline(holder.stdout).startswith("ready")
    quiet = through_bouncer.start(
        *FAST, "--wait", "--", "sh", "-c", "echo token $LEADERRUN_FENCING_TOKEN"
    )
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    assert quiet.wait(timeout=RUN_TIMEOUT_S) == 0
    assert read_rest(quiet.stdout) == "token 2\n"
    assert read_rest(quiet.stderr) == ""  # no error, no warning: just a later start
    # And the holder, whose lease connection may have been the pooled server
    # connection that LISTENed, saw nothing it would complain about.
    assert read_rest(holder.stderr) == ""
