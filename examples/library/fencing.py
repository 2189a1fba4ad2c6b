"""Fencing tokens in SQL: a write that a stale leader cannot make.

``is_leader()`` turns false before another replica can be elected, but a write
already on its way (a slow network, a paused process) can still arrive late.
The fencing token closes that gap: every term's token is larger than the last,
so the system written to keeps the largest token it has seen and refuses
smaller ones, in the same statement as the write::

    UPDATE report SET body = %(body)s, last_token = %(token)s
     WHERE name = %(name)s AND last_token <= %(token)s

Run it::

    python examples/library/fencing.py --dsn postgresql://db/app

It exits 0 after a fenced write, or 75 if a newer leader had already written.
"""

from __future__ import annotations

import argparse
import sys

import psycopg

from leaderrun import LeaderElector

SCHEMA = """
CREATE TABLE IF NOT EXISTS fenced_report (
    name       text   PRIMARY KEY,
    body       text   NOT NULL,
    last_token bigint NOT NULL
)"""

FENCED_WRITE = """
INSERT INTO fenced_report AS r (name, body, last_token)
VALUES (%(name)s, %(body)s, %(token)s)
ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, last_token = EXCLUDED.last_token
 WHERE r.last_token <= EXCLUDED.last_token"""


def fenced_write(dsn: str, name: str, body: str, token: int) -> bool:
    """Write ``body`` unless a newer leader (larger token) wrote already."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        cursor = conn.execute(
            FENCED_WRITE, {"name": name, "body": body, "token": token}
        )
        return cursor.rowcount == 1


def main() -> int:
    """Become leader, write once with the token, step down."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--lock-id", default="report-writer")
    parser.add_argument("--body", default="hello from the leader")
    args = parser.parse_args()

    with LeaderElector(args.lock_id, dsn=args.dsn) as elector:
        if not elector.wait_for_leadership(timeout_s=60):
            print("not elected within 60s", file=sys.stderr)
            return 75
        token = elector.token
        if token is None:  # lost again already
            return 75
        if fenced_write(args.dsn, args.lock_id, args.body, token):
            print(f"wrote with fencing token {token}")
            return 0
        print(f"refused: a newer leader wrote (our token {token})", file=sys.stderr)
        return 75


if __name__ == "__main__":
    sys.exit(main())
