"""Run ``leaderrun`` with its renewal thread sabotaged: F25 and F26.

Usage: ``sabotage.py die|stall LEADERRUN-ARGS...``

The real ``leaderrun`` runs in this process; only ``Renewer.attempt`` is wrapped,
after two good renewals, to raise (``die``: the thread crashes) or to block
forever (``stall``: a thread that no longer makes progress, as in a GC pause or
a bug). leaderrun's own code is otherwise untouched: nothing in it knows about
this.
"""

from __future__ import annotations

import sys
import threading

from leaderrun import heartbeat
from leaderrun.cli import main

GOOD_RENEWALS = 2


def sabotage(mode: str) -> None:
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


if __name__ == "__main__":
    sabotage(sys.argv.pop(1))
    sys.argv[0] = "leaderrun"
    main()
