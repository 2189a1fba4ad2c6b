"""The least a Python program must do to hand a lock on: the hand-off's baseline.

Usage: ``python handoff_baseline.py DSN SPEC_FILE LOCK_KEY hold|wait COMMAND...``.
``hold`` takes the lock, runs COMMAND, gives the lock back. ``wait`` waits for
it: for a lease, it queues, LISTENs for its turn and takes the lease when woken
(or finds it granted, when the spec's release grants it); for a session lock,
its taking statement waits in the server. Then it runs COMMAND and gives the
lock back. The statements come from SPEC_FILE (JSON, rendered by the bench:
``baseline_script.handoff_spec``). COMMAND runs by ``posix_spawn``, the
cheapest start Python has.

None of leaderrun's safety: no renewal, no watchdog, no kill deadline, no
waiting for the command's process group, no bound on a statement, no signal
handling. What leaderrun adds to this baseline is what those cost.
"""

import json
import os
import sys

import psycopg

dsn, spec_file, key, role, command = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    sys.argv[4],
    sys.argv[5:],
)
with open(spec_file) as f:
    spec = json.load(f)
conn = psycopg.connect(
    dsn,
    autocommit=True,
    prepare_threshold=None,
    application_name=f"bench-handoff-{role}",  # the bench sees the waiter wait
)
mine = {**spec[role], "key": key}
if role == "hold":
    row = conn.execute(spec["acquire"], mine).fetchone()
    if row is None or not row[0]:
        sys.exit("handoff_baseline: the lock was not free")
else:
    row = None
    if spec["listen"] is not None:  # a lease: take a place, sleep until woken
        with conn.pipeline():
            conn.execute(spec["listen"])
            first = conn.execute(spec["queue"], mine)
        row = first.fetchone()
        if row is not None and row[0]:
            sys.exit("handoff_baseline: the lock was free; the holder must hold it")
        print("waiting", file=sys.stderr, flush=True)
        for _notify in conn.notifies(stop_after=1, timeout=60):
            pass
    else:  # a session lock: the taking statement itself waits
        print("waiting", file=sys.stderr, flush=True)
    if spec["take"] is not None:
        row = conn.execute(spec["take"], mine).fetchone()
        if row is None or not row[0]:
            sys.exit("handoff_baseline: woken, but the lock was not granted")
assert row is not None  # the grant's token (the queue's row, when it was granted)
pid = os.posix_spawn(command[0], command, os.environ)
status = os.waitpid(pid, 0)[1]
conn.execute(spec["release"], {**mine, **spec["ending"], "token": row[1]})
conn.close()
sys.exit(os.waitstatus_to_exitcode(status))
