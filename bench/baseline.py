"""The baseline: the least a Python program must do to take and give back a lease.

Usage: ``python baseline.py DSN SPEC_FILE LOCK_KEY``. It imports psycopg, connects
the way leaderrun does (autocommit, no prepared statements), runs leaderrun's own
acquire and release statements with the parameters a plain run uses (rendered
by the bench into SPEC_FILE, JSON), and exits.
No argument parsing, no child, no renewal thread, no signal handling.
"""

import json
import sys

import psycopg

dsn, sql_file, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(sql_file) as f:
    spec = json.load(f)
conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
row = conn.execute(spec["acquire"], {**spec["acquire_params"], "key": key}).fetchone()
if row is None or not row[0]:
    sys.exit("baseline: the lock was not free")
conn.execute(spec["release"], {**spec["release_params"], "key": key, "token": row[1]})
conn.close()
