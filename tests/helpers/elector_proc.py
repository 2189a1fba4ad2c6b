"""A replica for the multi-process elector tests: samples is_leader() and reports.

Usage: python -m tests.helpers.elector_proc DSN LOCK LEASE_S

Prints ``ready`` once campaigning, then ``lead TOKEN T0 T1`` for every sample
that found it leading (T0 and T1 on CLOCK_BOOTTIME, taken just before and just
after asking), ``elected TOKEN`` and ``lost REASON`` from the callbacks. On
SIGTERM it stops the elector (which releases) and prints ``stopped``.
"""

import faulthandler
import signal
import sys
import time

from leaderrun import LeaderElector
from leaderrun.clock import boottime

SAMPLE_S = 0.02
STOP_DUMP_S = 20.0


def main() -> int:
    dsn, lock, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    # A plain flag, not a threading.Event: the handler runs in the main thread
    # between two bytecodes, possibly inside Event.wait() while it holds the
    # Event's (non-reentrant) lock, and Event.set() there would deadlock.
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    elector = LeaderElector(
        lock,
        dsn=dsn,
        lease_s=lease_s,
        on_elected=lambda token: say(f"elected {token}"),
        on_lost=lambda reason: say(f"lost {reason}"),
    )
    with elector:
        say("ready")
        while not stopping:
            time.sleep(SAMPLE_S)
            t0 = boottime()
            token = elector.token
            t1 = boottime()
            if token is not None:
                say(f"lead {token} {t0:.6f} {t1:.6f}")
        # stop() should take at most a few attempt budgets; if it hangs, leave
        # every thread's stack on stderr for the failing test's report.
        faulthandler.dump_traceback_later(STOP_DUMP_S)
    faulthandler.cancel_dump_traceback_later()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
