"""Run ``leaderrun`` with one part of it deliberately broken.

Usage: ``sabotage.py MODE LEADERRUN-ARGS...``

The real ``leaderrun`` runs in this process with one piece replaced; nothing in
leaderrun's own code knows about this. The modes:

- ``die``, ``stall`` (F25, F26): after two good renewals, ``Renewer.attempt``
  raises (the thread crashes) or blocks forever (a thread that no longer makes
  progress, as in a GC pause or a bug).
- ``no-deadline``: the kill deadline always lies an hour ahead, for the
  supervisor, the renewal thread and the watchdog alike: a holder that cannot
  renew keeps its child past its lease, and renews late when it can again
  (``local-deadline`` broken). Only a renewal that finds the lease taken stops
  the child.
- ``delete-on-release``: the release deletes the lease row instead of clearing
  it, so the next acquire starts the fencing tokens again at 1
  (``growing-token`` broken).

The last two exist so that the soak (``tests/soak``) can show that its checker
catches a broken build.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import LiteralString

from leaderrun import heartbeat
from leaderrun.cli import main
from leaderrun.clock import boottime

GOOD_RENEWALS = 2

NO_DEADLINE_S = 3600.0

DELETE_ON_RELEASE: LiteralString = """
DELETE FROM {table}
 WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
RETURNING NULL::text AS holder"""


def renewal_thread(mode: str) -> None:
    original = heartbeat.Renewer.attempt
    calls = [0]

    def attempt(self: heartbeat.Renewer) -> heartbeat.Renewal:
        calls[0] += 1
        if calls[0] > GOOD_RENEWALS:
            sys.stderr.write(f"sabotage: renewal thread {mode}s now\n")
            sys.stderr.flush()
            if mode == "die":
                raise RuntimeError("injected fault: the renewal thread dies")
            threading.Event().wait()  # stalls forever
        return original(self)

    heartbeat.Renewer.attempt = attempt  # type: ignore[method-assign]


def no_deadline() -> None:
    original = heartbeat.LeaseState.snapshot

    def snapshot(self: heartbeat.LeaseState) -> tuple[float, str | None]:
        _, lost = original(self)
        return boottime() + NO_DEADLINE_S, lost

    heartbeat.LeaseState.snapshot = snapshot  # type: ignore[method-assign]


def delete_on_release() -> None:
    from leaderrun.stores import postgres, postgres_sql

    # Each store builds its statements from this mapping when it is made.
    queries = {**postgres_sql.QUERIES, "release": DELETE_ON_RELEASE}
    postgres.QUERIES = queries  # type: ignore[attr-defined]


SABOTAGES: dict[str, Callable[[], None]] = {
    "die": lambda: renewal_thread("die"),
    "stall": lambda: renewal_thread("stall"),
    "no-deadline": no_deadline,
    "delete-on-release": delete_on_release,
}


def sabotage(mode: str) -> None:
    """Break leaderrun, in this process, the way ``mode`` says."""
    SABOTAGES[mode]()


if __name__ == "__main__":
    sabotage(sys.argv.pop(1))
    sys.argv[0] = "leaderrun"
    main()
