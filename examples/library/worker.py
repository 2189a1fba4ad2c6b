"""A worker loop that consumes work only while leading, and stops on ``on_lost``.

Run it on every replica::

    LEADERRUN_DSN=postgresql://db/app python examples/library/worker.py

One replica works; when it loses the lease (the database is unreachable for
too long, or an operator takes the lock), ``on_lost`` tells the loop to stop
before another replica can be elected, and it goes back to waiting.
"""

from __future__ import annotations

import argparse
import threading

from leaderrun import LeaderElector


class Worker:
    """Processes items while leading; ``on_lost`` stops it mid-batch."""

    def __init__(self) -> None:
        self.stop_work = threading.Event()
        self.done = 0

    def on_elected(self, token: int) -> None:
        """A new term starts: work may go on (called on the campaign thread)."""
        print(f"elected with fencing token {token}", flush=True)
        self.stop_work.clear()

    def on_lost(self, reason: str) -> None:
        """The term ended: stop now. The lease is released only after we return."""
        print(f"lost leadership: {reason}", flush=True)
        self.stop_work.set()

    def work_one(self, token: int) -> None:
        """One unit of work; pass the token to whatever it writes to."""
        self.done += 1
        self.stop_work.wait(0.1)  # stands for real work, cut short on loss


def main() -> None:
    """Campaign, and work whenever leading, until ``--items`` are done."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=None, help="default: LEADERRUN_DSN")
    parser.add_argument("--lock-id", default="queue-consumer")
    parser.add_argument("--items", type=int, default=0, help="0: forever")
    args = parser.parse_args()

    worker = Worker()
    elector = LeaderElector(
        args.lock_id,
        dsn=args.dsn,
        on_elected=worker.on_elected,
        on_lost=worker.on_lost,
    )
    with elector:
        while args.items == 0 or worker.done < args.items:
            if not elector.wait_for_leadership(timeout_s=1.0):
                continue
            token = elector.token
            if token is None or worker.stop_work.is_set():
                continue  # lost between the two checks
            worker.work_one(token)
    print(f"processed {worker.done} items", flush=True)


if __name__ == "__main__":
    main()
