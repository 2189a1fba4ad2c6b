"""A replica for the multi-process elector tests: samples is_leader() and reports.

Usage: python -m tests.helpers.elector_proc DSN LOCK LEASE_S [OPTIONS]

Prints ``ready`` once campaigning, then ``lead TOKEN T0 T1`` for every sample
that found it leading (T0 and T1 on CLOCK_BOOTTIME, taken just before and just
after asking), ``unlead TOKEN T0 T1`` for the first sample that found a term
over (not leading, or leading with another token), ``elected TOKEN T`` and
``lost REASON`` from the callbacks. On SIGTERM it stops the elector (which
releases) and prints ``stopped``.

Options:

- ``--kill-grace S``: the elector's kill grace (default: its own default).
- ``--work-s S``: a worker thread calls a ``@leader_only`` function over and over;
  each call lasts S seconds without checking leadership (work that began just
  before a loss and fits in the grace), and prints ``work TOKEN T0 T1``, T0 taken
  before the call was let in and T1 after it returned.
- ``--sabotage stall|die``: the renewal thread stalls (or dies) after two good
  renewals (``tests/faults/sabotage.py``); the database still answers.
"""

import argparse
import faulthandler
import signal
import sys
import threading
import time

from leaderrun import LeaderElector, leader_only
from leaderrun.clock import boottime

SAMPLE_S = 0.02
STOP_DUMP_S = 20.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("lock")
    parser.add_argument("lease_s", type=float)
    parser.add_argument("--kill-grace", type=float, default=None)
    parser.add_argument("--work-s", type=float, default=None)
    parser.add_argument("--sabotage", choices=("stall", "die"), default=None)
    args = parser.parse_args()
    if args.sabotage is not None:
        from tests.faults.sabotage import sabotage

        sabotage(args.sabotage)
    # A plain flag, not a threading.Event: the handler runs in the main thread
    # between two bytecodes, possibly inside Event.wait() while it holds the
    # Event's (non-reentrant) lock, and Event.set() there would deadlock.
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    out = threading.Lock()

    def say(line: str) -> None:
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    elector = LeaderElector(
        args.lock,
        dsn=args.dsn,
        lease_s=args.lease_s,
        kill_grace_s=args.kill_grace,
        on_elected=lambda token: say(f"elected {token} {boottime():.6f}"),
        on_lost=lambda reason: say(f"lost {reason}"),
    )

    @leader_only(elector=elector)
    def work(work_s: float) -> int:
        token = elector.token  # leading a moment ago; 0 if lost since
        time.sleep(work_s)
        return token or 0

    def worker(work_s: float) -> None:
        while not stopping:
            t0 = boottime()
            token = work(work_s)
            if token is None:
                time.sleep(SAMPLE_S)
            else:
                say(f"work {token} {t0:.6f} {boottime():.6f}")

    with elector:
        say("ready")
        if args.work_s is not None:
            threading.Thread(target=worker, args=(args.work_s,), daemon=True).start()
        last_token = None
        while not stopping:
            time.sleep(SAMPLE_S)
            t0 = boottime()
            token = elector.token
            t1 = boottime()
            if last_token is not None and token != last_token:
                # Also when a new term follows at once: the old one ended first.
                say(f"unlead {last_token} {t0:.6f} {t1:.6f}")
            if token is not None:
                say(f"lead {token} {t0:.6f} {t1:.6f}")
            last_token = token
        # stop() should take at most a few attempt budgets; if it hangs, leave
        # every thread's stack on stderr for the failing test's report.
        faulthandler.dump_traceback_later(STOP_DUMP_S)
    faulthandler.cancel_dump_traceback_later()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
