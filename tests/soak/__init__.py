"""A randomized fault soak with a lost-update checker (marker ``soak``).

Three to five leaderrun contenders on one lock, each behind its own TCP proxy to
a real PostgreSQL, run short jobs in a loop while a seeded nemesis injects
overlapping faults (:mod:`tests.soak.nemesis`). Each job increments two shared
counters, one fenced with ``LEADERRUN_FENCING_TOKEN`` as docs/safety.md shows
and one not. The checker (:mod:`tests.soak.history`) judges the history from the
jobs' own stamps, pidfd death times and the database, never from leaderrun's
bookkeeping: no overlap, tokens strictly increasing, the lock retaken after the
last heal, no fenced lost update.

The short soaks run in the default suite (``tests/soak/test_soak.py``); the
long one is ``python -m tests.soak --minutes 30 --seed N``, which writes a
report. A failure prints its seed and the command that replays it.
"""
