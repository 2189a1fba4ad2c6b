"""The baseline: the least a Python program must do to take and give back a lease.

Usage: ``python baseline.py DSN SQL_FILE LOCK_KEY``. It imports psycopg, connects
the way leaderrun does (autocommit, no prepared statements), runs leaderrun's own
acquire and release statements (rendered by the bench into SQL_FILE), and exits.
No argument parsing, no child, no renewal thread, no signal handling.
"""

import json
import sys

import psycopg

dsn, sql_file, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(sql_file) as f:
    statements = json.load(f)
conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
row = conn.execute(
    statements["acquire"],
    {
        "key": key,
        "name": None,
        "holder": "baseline",
        "lease_s": 30.0,
        "host": "baseline",
        "pid": 0,
        "command": "true",
    },
).fetchone()
if row is None or not row[0]:
    sys.exit("baseline: the lock was not free")
conn.execute(
    statements["release"],
    {"key": key, "holder": "baseline", "token": row[1], "channel": "baseline"},
)
conn.close()
