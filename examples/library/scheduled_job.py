"""A job that runs every minute on the leader only, with the standard library's sched.

Run it on every replica::

    LEADERRUN_DSN=postgresql://db/app python examples/library/scheduled_job.py

Every replica keeps the schedule; only the one that leads at the moment a tick
fires runs the job, the others skip it. ``--every`` and ``--ticks`` shorten it
for a demonstration (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import sched
import time

from leaderrun import LeaderElector, leader_only


@leader_only
def send_daily_report(tick: int) -> str:
    """The leader-only work; on a follower the call returns None at once."""
    print(f"tick {tick}: sending the report", flush=True)
    return "sent"


def main() -> None:
    """Schedule the job, campaign, and run the schedule until it is done."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=None, help="default: LEADERRUN_DSN")
    parser.add_argument("--lock-id", default="daily-report")
    parser.add_argument("--every", type=float, default=60.0, help="seconds")
    parser.add_argument("--ticks", type=int, default=0, help="0: forever")
    parser.add_argument("--lease", type=float, default=30.0, help="seconds")
    args = parser.parse_args()

    scheduler = sched.scheduler(time.monotonic, time.sleep)

    def tick(n: int) -> None:
        if send_daily_report(n) is None:
            print(f"tick {n}: not the leader, skipped", flush=True)
        if args.ticks == 0 or n < args.ticks:
            scheduler.enter(args.every, 0, tick, (n + 1,))

    # Entering the block starts the campaign and makes this the current elector
    # that @leader_only asks; leaving it steps down and releases the lease.
    with LeaderElector(args.lock_id, dsn=args.dsn, lease_s=args.lease) as elector:
        elector.wait_for_leadership(timeout_s=args.every)
        scheduler.enter(0, 0, tick, (1,))
        scheduler.run()


if __name__ == "__main__":
    main()
