"""One contender for a SQLite lease, in a process of its own.

Usage: ``sqlite_contender.py PATH LOCK N LEASE_S``. It prints ``ready``, waits
for a line on stdin (the starting gun, so that every contender races from the
same instant), then connects, acquires once and prints the outcome as JSON: the
token it got, ``null`` if the lock was held, or ``"error: ..."``.
"""

import json
import sys
from pathlib import Path

from leaderrun.errors import LeaderrunError
from leaderrun.lease import parse_lock_id
from leaderrun.stores.base import Claim
from leaderrun.stores.sqlite import SqliteLeaseStore


def main() -> None:
    path, lock, n, lease_s = sys.argv[1:5]
    store = SqliteLeaseStore(Path(path))
    claim = Claim(holder=f"h{n}:{n}:nonce", host=f"h{n}", pid=int(n), command="x")
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        # Connect after the gun: first users also race to switch the file to WAL.
        session = store.connect()
        result = session.acquire(parse_lock_id(lock), claim, float(lease_s))
        outcome: int | str | None = None if result.lease is None else result.lease.token
    except LeaderrunError as exc:
        outcome = f"error: {exc.message}"
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
