"""PostgreSQL's text: the named statements, the DDL, and the SQL a DBA runs.

Every lease statement is a single autocommit statement whose times come from the
server's ``now()`` (``database-clock``, ``one-statement``, docs/safety.md).
Schema and table are always quoted identifiers (:func:`statement` fills them
in), and every value is a bound parameter. :data:`QUERIES` names the statements
the shared SQL session runs (:data:`leaderrun.stores.sql.QUERIES`); the store
in :mod:`leaderrun.stores.postgres` runs them.

Which tables are leaderrun's (``own-tables-only``): its own are told by their
core columns (:data:`OWN_TABLE_COLUMNS`); :data:`TABLE_COLUMNS` is read from
the DDL, so a new column is one line of :data:`DDL` and one of the upgrade
that ``init`` runs on an older table (:data:`UPGRADE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import LiteralString

from psycopg import sql

from leaderrun.errors import ForeignTableError, SchemaMissingError
from leaderrun.stores.base import RUN_TABLE, TABLE
from leaderrun.stores.sql import columns_of

# {create} is CREATE TABLE IF NOT EXISTS in the SQL printed for a DBA (safe to
# repeat), and a plain CREATE TABLE when leaderrun runs it, in one transaction
# with the comment: a table that exists already, leaderrun's or not, is left
# as it is, comment included.
DDL: LiteralString = """
{create} {table} (
    lock_key     bigint      PRIMARY KEY,
    lock_name    text,
    holder       text,
    token        bigint      NOT NULL,
    acquired_at  timestamptz NOT NULL,
    renewed_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    host         text,
    pid          integer,
    command      text,
    window_start timestamptz,
    window_ok    boolean,
    cadence      text,
    runs_ok      bigint      NOT NULL DEFAULT 0,
    runs_failed  bigint      NOT NULL DEFAULT 0,
    runs_killed  bigint      NOT NULL DEFAULT 0,
    runs_timeout bigint      NOT NULL DEFAULT 0,
    runs_lost    bigint      NOT NULL DEFAULT 0,
    last_ok_at   timestamptz,
    waiters      jsonb
)"""

COMMENT: LiteralString = """
COMMENT ON TABLE {table} IS
'leaderrun leases. Never delete rows: the fencing token must keep increasing.'"""

# The --wait queue's expressions over the row `l` (see ACQUIRE): the places
# alive now, and ours among them; filled into the statements that use them.
_QUEUE: Mapping[str, LiteralString] = {
    # Our place's arrival time, if we have a live place.
    "mine": """(
    SELECT (p->>'q')::float8
      FROM jsonb_array_elements(coalesce(l.waiters, '[]'::jsonb)) AS p
     WHERE (p->>'x')::float8 > extract(epoch FROM now()) AND p->>'w' = %(holder)s)""",
    # Whether a live place is ahead of ours (a new place comes after them all).
    "ahead": """EXISTS (
    SELECT FROM jsonb_array_elements(coalesce(l.waiters, '[]'::jsonb)) AS p
     WHERE (p->>'x')::float8 > extract(epoch FROM now()) AND p->>'w' <> %(holder)s
       AND ((p->>'q')::float8, p->>'w') < (coalesce(
           (SELECT (o->>'q')::float8
              FROM jsonb_array_elements(l.waiters) AS o
             WHERE (o->>'x')::float8 > extract(epoch FROM now())
               AND o->>'w' = %(holder)s),
           extract(epoch FROM now())), %(holder)s))""",
    # The live places but ours.
    "others": """(
    SELECT coalesce(jsonb_agg(p), '[]'::jsonb)
      FROM jsonb_array_elements(coalesce(l.waiters, '[]'::jsonb)) AS p
     WHERE (p->>'x')::float8 > extract(epoch FROM now()) AND p->>'w' <> %(holder)s)""",
    # The head's wake-up channel.
    "head": """(
    SELECT p->>'c'
      FROM jsonb_array_elements(coalesce(l.waiters, '[]'::jsonb)) AS p
     WHERE (p->>'x')::float8 > extract(epoch FROM now())
     ORDER BY (p->>'q')::float8, p->>'w' LIMIT 1)""",
}


def _queued(template: LiteralString) -> LiteralString:
    """``template`` with the queue's expressions filled in (before the tables)."""
    for name, expression in _QUEUE.items():
        template = template.replace("{" + name + "}", expression)
    return template


# One statement: take the lock when it is free (holder NULL) or expired in the
# server's time, bumping the token in the same row; otherwise report the holder.
# In READ COMMITTED the ON CONFLICT path locks the row and re-checks the WHERE on
# its latest version, so of N racing contenders exactly one wins. The second
# branch reads the pre-statement snapshot: good enough to know how long to sleep.
#
# With --once-per or --schedule, the slot of the server's now() is chosen here
# too, from the table of slots the client built around its guess of that now
# (leaderrun.slots.SlotTable: opens/starts as epoch seconds, valid below
# slots_until); a row whose window_start is that slot refuses in the same WHERE
# (unless retry_failed and the slot's run did not end ok), so no client clock
# decides whether a slot ran. If the server's now is outside the table (a client
# clock far off), nothing is taken and slot_known is false: the client builds a
# table around db_now_s and asks again. The row records the cadence (JSON) of
# its last slotted run. With history (keep not NULL), the same statement
# records the run, closes runs whose holder died as 'lost' (their last renewal
# is the last sign of life, read from the pre-statement snapshot), and prunes
# the lock's history to the newest `keep` tokens.
#
# The same statement refuses, and takes nothing, on a session whose commits a
# crash could forget (synchronous_commit off): the check costs no statement of
# its own (`synchronous_commit` is returned, and the client says why).
#
# With queued (--wait), contenders are served in arrival order (the fair queue,
# leaderrun.handoff). The queue is the lease row's `waiters` column, a JSON array
# of places {w: holder, c: its wake-up channel, q: the server's time (epoch s) of
# its first attempt, x: when the place lapses}; each attempt keeps its place for
# place_s more. A live place ahead of ours refuses the attempt even when the lock
# is free, and turn_in_s says when the head's place lapses (its waiter died); a
# grant removes the winner's place, and every queued attempt drops the lapsed
# ones. In the row, so that the head is decided under the row's lock (exactly,
# in READ COMMITTED: every queue change is computed from the row's newest
# version), and a role needs no privilege beyond the lease table's. Plain
# attempts (skip mode) neither queue nor look at the queue.
_ACQUIRE: LiteralString = """
WITH e AS (
    SELECT extract(epoch FROM now())::float8 AS now_s,
           current_setting('synchronous_commit') AS synchronous_commit
), w AS (
    SELECT to_timestamp(s.start_s) AS window_start, e.now_s, e.synchronous_commit,
           %(slots_until)s::float8 IS NULL
           OR (s.start_s IS NOT NULL AND e.now_s < %(slots_until)s::float8) AS known,
           e.synchronous_commit <> 'off' AS safe
      FROM e LEFT JOIN LATERAL (
          SELECT t.start_s
            FROM unnest(%(slot_opens)s::float8[], %(slot_starts)s::float8[])
                 AS t(opens_s, start_s)
           WHERE t.opens_s <= e.now_s
           ORDER BY t.opens_s DESC LIMIT 1) AS s ON true
), prev AS (
    SELECT token, renewed_at FROM {table} WHERE lock_key = %(key)s
), attempt AS (
    INSERT INTO {table} AS l
        (lock_key, lock_name, holder, token, acquired_at, renewed_at, expires_at,
         host, pid, command, window_start, window_ok, cadence)
    SELECT %(key)s, %(name)s, %(holder)s, 1, now(), now(),
           now() + make_interval(secs => %(lease_s)s), %(host)s, %(pid)s,
           %(command)s, w.window_start, NULL, %(cadence)s
      FROM w WHERE w.known AND w.safe
    ON CONFLICT (lock_key) DO UPDATE
        SET lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder,
            token = l.token + 1, acquired_at = now(), renewed_at = now(),
            expires_at = EXCLUDED.expires_at, host = EXCLUDED.host,
            pid = EXCLUDED.pid, command = EXCLUDED.command,
            window_start = coalesce(EXCLUDED.window_start, l.window_start),
            window_ok = CASE WHEN EXCLUDED.window_start IS NULL THEN l.window_ok END,
            cadence = coalesce(EXCLUDED.cadence, l.cadence),
            waiters = {taken},
            -- The runs the `lost` CTE closes, read from the same snapshot.
            runs_lost = l.runs_lost + (
                SELECT count(*) FROM {runs} r
                 WHERE %(keep)s::integer IS NOT NULL
                   AND r.lock_key = %(key)s AND r.finished_at IS NULL
                   AND r.token <= l.token AND r.token > l.token + 1 - %(keep)s::integer)
        WHERE (l.holder IS NULL OR l.expires_at <= now())
          AND NOT {ahead}
          AND l.lock_name IS NOT DISTINCT FROM EXCLUDED.lock_name
          AND NOT coalesce(
                l.window_start = EXCLUDED.window_start
                AND NOT (%(retry_failed)s AND l.window_ok IS NOT TRUE), false)
    RETURNING l.token
), lost AS (
    UPDATE {runs} AS r
       SET outcome = 'lost',
           finished_at = coalesce(
               (SELECT p.renewed_at FROM prev p WHERE p.token = r.token), now())
     WHERE %(keep)s::integer IS NOT NULL
       AND r.lock_key = %(key)s AND r.finished_at IS NULL
       AND r.token < (SELECT token FROM attempt)
       AND r.token > (SELECT token FROM attempt) - %(keep)s::integer
), started AS (
    INSERT INTO {runs} AS r
        (lock_key, lock_name, token, holder, host, pid, command, window_start,
         started_at)
    SELECT %(key)s, %(name)s, a.token, %(holder)s, %(host)s, %(pid)s, %(command)s,
           w.window_start, now()
      FROM attempt a, w
     WHERE %(keep)s::integer IS NOT NULL
    -- Only if the lease table was emptied by hand and tokens restarted.
    ON CONFLICT (lock_key, token) DO UPDATE
        SET lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder,
            host = EXCLUDED.host, pid = EXCLUDED.pid, command = EXCLUDED.command,
            window_start = EXCLUDED.window_start, started_at = EXCLUDED.started_at,
            finished_at = NULL, exit_status = NULL, outcome = NULL
), pruned AS (
    DELETE FROM {runs} AS r
     WHERE r.lock_key = %(key)s
       AND r.token <= (SELECT token FROM attempt) - %(keep)s::integer
), placed AS ({placed})
SELECT true AS acquired, a.token, NULL::text AS holder, NULL::text AS host,
       NULL::integer AS pid, NULL::float8 AS expires_in_s, %(name)s AS lock_name,
       w.window_start, false AS window_done, true AS slot_known, w.now_s AS db_now_s,
       NULL::float8 AS turn_in_s, w.synchronous_commit
  FROM attempt a, w
UNION ALL
SELECT false, l.token, l.holder, l.host, l.pid,
       extract(epoch FROM l.expires_at - now())::float8, l.lock_name, w.window_start,
       coalesce(l.window_start = w.window_start
                AND NOT (%(retry_failed)s AND l.window_ok IS NOT TRUE), false),
       true, w.now_s, (SELECT turn_in_s FROM placed), w.synchronous_commit
  FROM w LEFT JOIN {table} l ON l.lock_key = %(key)s
 WHERE w.known AND NOT EXISTS (SELECT FROM attempt)
UNION ALL
SELECT false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false, false, w.now_s,
       NULL, w.synchronous_commit
  FROM w WHERE NOT w.known"""

# The acquire's two forms: a plain try (skip mode) neither queues nor reads the
# queue, only keeps it; a queued one (--wait) waits its turn and keeps its place.
_PLACED: LiteralString = """
    UPDATE {table} AS l
       SET waiters = {others} || jsonb_build_array(jsonb_build_object(
               'w', %(holder)s::text, 'c', %(channel)s::text,
               'q', coalesce({mine}, extract(epoch FROM now())),
               'x', extract(epoch FROM now()) + %(place_s)s::float8))
      FROM w
     WHERE l.lock_key = %(key)s AND w.known AND w.safe
       AND NOT EXISTS (SELECT FROM attempt)
    RETURNING (SELECT CASE WHEN p->>'w' <> %(holder)s
                           THEN (p->>'x')::float8 - extract(epoch FROM now()) END
                 FROM jsonb_array_elements(l.waiters) AS p
                ORDER BY (p->>'q')::float8, p->>'w' LIMIT 1) AS turn_in_s
"""

ACQUIRE: LiteralString = _queued(
    _ACQUIRE.replace("{ahead}", "false")
    .replace("{taken}", "l.waiters")
    .replace("{placed}", "SELECT NULL::float8 AS turn_in_s WHERE false")
)

ACQUIRE_QUEUED: LiteralString = _queued(
    _ACQUIRE.replace("{taken}", "{others}").replace("{placed}", _PLACED)
)

# A compare-and-swap on (holder, token): every takeover bumps the token, so a
# match proves nobody acquired in between, and a stale renewal matches nothing.
# An expired lease is not renewed either: a renewal held up (a frozen server, a
# row lock) until after expiry comes too late for its holder, which has stopped
# its child; reviving the row would only keep every contender out for one more
# lease.
RENEW: LiteralString = """
UPDATE {table}
   SET expires_at = now() + make_interval(secs => %(lease_s)s), renewed_at = now()
 WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
   AND expires_at > now()"""

# Release keeps the row, and so the token, for the life of the table. With a
# run's end it also closes the run (overriding a 'lost' that another node guessed:
# the holder knows better how it ended, though a release that comes late, after a
# partition, keeps the guessed finish, the last renewal, rather than its own
# now()), stores its captured output and, for --min-hold, keeps the lease taken
# by the same holder until acquired_at + min_hold in the server's time, so a
# late node finds it held without the holder staying alive. window_ok records,
# for --retry-failed, whether the slot's run ended well. A run that never
# started (a grant too late to use, a cancel) leaves no trace: its history row
# goes and its slot is not spent. The lease row counts each run once, by
# outcome (monotonic counters for metrics, kept when history is pruned): here,
# unless another node already closed it as lost (and counted it so).
# Still one statement, it also wakes the lock's waiters (leaderrun.handoff) when
# the lock is really free now: the head of the --wait queue on its own channel,
# and on the lock's channel whoever listens there (a waiter of an older
# version); the notifications go out at commit, and only if the lease was ours.
RELEASE: LiteralString = _queued("""
WITH run AS (
    SELECT finished_at IS NULL AS open FROM {runs}
     WHERE lock_key = %(key)s AND token = %(token)s AND holder = %(holder)s
), counted AS (
    SELECT %(started)s AND %(outcome)s::text IS NOT NULL
           AND coalesce((SELECT open FROM run), true) AS once
), finished AS (
    UPDATE {runs}
       SET finished_at = coalesce(finished_at, now()),
           exit_status = %(exit_status)s::integer,
           outcome = %(outcome)s::text,
           output = %(output)s::text
     WHERE %(outcome)s::text IS NOT NULL AND %(started)s
       AND lock_key = %(key)s AND token = %(token)s AND holder = %(holder)s
       AND (finished_at IS NULL OR outcome = 'lost')
), unstarted AS (
    DELETE FROM {runs}
     WHERE NOT %(started)s
       AND lock_key = %(key)s AND token = %(token)s AND holder = %(holder)s
), released AS (
    UPDATE {table} AS l
       SET holder = CASE
               WHEN acquired_at + make_interval(secs => %(min_hold_s)s) > now()
               THEN holder END,
           expires_at = greatest(now(),
                                 acquired_at + make_interval(secs => %(min_hold_s)s)),
           window_ok = CASE WHEN %(started)s
                            THEN coalesce(%(window_ok)s::boolean, window_ok) END,
           window_start = CASE WHEN %(started)s THEN window_start END,
           runs_ok = runs_ok + (c.once AND %(outcome)s = 'ok')::int,
           runs_failed = runs_failed + (c.once AND %(outcome)s = 'failed')::int,
           runs_killed = runs_killed + (c.once AND %(outcome)s = 'killed')::int,
           runs_timeout = runs_timeout + (c.once AND %(outcome)s = 'timeout')::int,
           runs_lost = runs_lost + (c.once AND %(outcome)s = 'lost')::int,
           last_ok_at = CASE WHEN c.once AND %(outcome)s = 'ok' THEN now()
                             ELSE last_ok_at END
      FROM counted c
     WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
    RETURNING holder, {head} AS head
)
SELECT (SELECT pg_notify(%(channel)s, '') WHERE r.holder IS NULL),
       (SELECT pg_notify(r.head, '') WHERE r.holder IS NULL AND r.head IS NOT NULL)
  FROM released r""")

# A waiter that gives up (--wait-timeout, a signal) leaves the queue, and if the
# lock is free now wakes the next in line, which would otherwise sleep until
# this place lapsed.
LEAVE: LiteralString = _queued("""
WITH gone AS (
    UPDATE {table} AS l SET waiters = {others}
     WHERE l.lock_key = %(key)s AND {mine} IS NOT NULL
    RETURNING l.holder IS NULL OR l.expires_at <= now() AS free, {head} AS head
)
SELECT pg_notify(g.head, '') FROM gone g WHERE g.free AND g.head IS NOT NULL""")

LISTEN: LiteralString = "LISTEN {channel}"

MAX_CHANNEL_BYTES = 63
"""NAMEDATALEN - 1: PostgreSQL refuses longer channel names in pg_notify()."""


def wake_channel(holder: str) -> str:
    """The NOTIFY channel on which the release wakes ``holder``, queued to wait.

    Its own, so that a release wakes only the head of the queue: the end of
    the holder identity (``host:pid:nonce``), whose nonce no other process
    shares (``unique-holder``), cut to PostgreSQL's limit from the front.
    """
    prefix = "leaderrun:w:"
    tail = holder.encode()[-(MAX_CHANNEL_BYTES - len(prefix)) :]
    return prefix + tail.decode(errors="ignore")


def release_channel(schema: str, key: int) -> str:
    """The NOTIFY channel on which releases of the lock ``key`` are announced.

    The schema is part of it, since each schema has its own table. A schema so
    long that the name is cut can only make two locks share a channel, which
    costs their waiters a spurious wake-up, never a wrong acquire.
    """
    channel = f"leaderrun:{key}" if schema == "public" else f"leaderrun:{key}:{schema}"
    return channel.encode()[:MAX_CHANNEL_BYTES].decode(errors="ignore")


# init's upgrade of a lease table made by an older version: every column added
# since the first, each as DDL declares it (a new one has them from the start).
# A new lease column is a line of DDL and a line here.
LEASE_UPGRADE: LiteralString = """
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS window_start timestamptz,
    ADD COLUMN IF NOT EXISTS window_ok    boolean,
    ADD COLUMN IF NOT EXISTS cadence      text,
    ADD COLUMN IF NOT EXISTS runs_ok      bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_failed  bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_killed  bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_timeout bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS runs_lost    bigint      NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_ok_at   timestamptz,
    ADD COLUMN IF NOT EXISTS waiters      jsonb"""

# The same for the run table: every column added since its first version.
RUN_UPGRADE: LiteralString = """
ALTER TABLE {runs}
    ADD COLUMN IF NOT EXISTS output text"""

RUN_DDL: LiteralString = """
{create} {runs} (
    lock_key     bigint      NOT NULL,
    lock_name    text,
    token        bigint      NOT NULL,
    holder       text        NOT NULL,
    host         text,
    pid          integer,
    command      text,
    window_start timestamptz,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    exit_status  integer,
    outcome      text CHECK (outcome IN ('ok', 'failed', 'killed', 'timeout', 'lost')),
    output       text,
    PRIMARY KEY (lock_key, token)
)"""

RUN_COMMENT: LiteralString = """
COMMENT ON TABLE {runs} IS
'leaderrun run history: one row per run, pruned per lock by leaderrun itself.'"""

# A run with no outcome is 'running' while its lease (same token) is live, and
# otherwise lost: its holder died and nobody has taken the lock since.
_RUN_COLUMNS: LiteralString = """
SELECT r.lock_key, r.lock_name, r.token, r.holder, r.host, r.pid, r.command,
       r.window_start, r.started_at, r.finished_at, r.exit_status,
       coalesce(r.outcome,
                CASE WHEN l.token = r.token AND l.holder IS NOT NULL
                          AND l.expires_at > now()
                     THEN 'running' ELSE 'lost' END) AS outcome,
       extract(epoch FROM coalesce(
           r.finished_at,
           CASE WHEN l.token = r.token THEN least(l.renewed_at, now()) END,
           now()) - r.started_at)::float8 AS duration_s
  FROM {runs} r LEFT JOIN {table} l ON l.lock_key = r.lock_key"""

HISTORY: LiteralString = (
    _RUN_COLUMNS
    + """
 WHERE %(key)s::bigint IS NULL OR r.lock_key = %(key)s::bigint
 ORDER BY r.started_at DESC, r.lock_key, r.token DESC
 LIMIT %(limit)s"""
)

LAST_RUNS: LiteralString = (
    """
SELECT DISTINCT ON (lock_key) * FROM ("""
    + _RUN_COLUMNS
    + """
) AS runs
 ORDER BY lock_key, token DESC"""
)


RUN_OUTPUT: LiteralString = """
SELECT token, output FROM {runs}
 WHERE lock_key = %(key)s AND (%(token)s::bigint IS NULL OR token = %(token)s)
 ORDER BY token DESC LIMIT 1"""


SCHEMA: tuple[LiteralString, ...] = (
    DDL,
    COMMENT,
    LEASE_UPGRADE,
    RUN_DDL,
    RUN_COMMENT,
    RUN_UPGRADE,
)
"""Every DDL statement a DBA runs, in order; each is idempotent."""

CREATE: Mapping[str, tuple[LiteralString, LiteralString]] = {
    TABLE: (DDL, COMMENT),
    RUN_TABLE: (RUN_DDL, RUN_COMMENT),
}
"""How leaderrun creates each of its tables: the table, then its comment."""

UPGRADE: Mapping[str, LiteralString] = {TABLE: LEASE_UPGRADE, RUN_TABLE: RUN_UPGRADE}
"""What ``init`` runs on a table of an older version (and only ``init``)."""

TABLE_COLUMNS: Mapping[str, tuple[str, ...]] = {
    TABLE: columns_of(DDL),
    RUN_TABLE: columns_of(RUN_DDL),
}
"""Every column of leaderrun's tables as this version makes them, read from the DDL."""

OWN_TABLE_COLUMNS: Mapping[str, frozenset[str]] = {
    TABLE: frozenset({"lock_key", "holder", "token", "expires_at"}),
    RUN_TABLE: frozenset({"lock_key", "token", "holder", "started_at", "outcome"}),
}
"""The core columns that make a table leaderrun's, in every version so far.

A table lacking any of them is another program's (the seed library's
``leader_lease`` has ``id, leader_id, expires_at, created_at``) and is never
touched. Not the comment: a table made by hand from the printed SQL may lack it.
"""

# Everything under leaderrun's table names in one schema: read from the catalog,
# so it works without privileges on the tables (or even USAGE on the schema), and
# waits for no lock on them.
INSPECT: LiteralString = """
SELECT c.relname::text, c.relkind::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = ANY(%(names)s::text[])"""

SYNCHRONOUS_COMMIT: LiteralString = "SELECT current_setting('synchronous_commit')"

# Transaction-scoped (set_config's is_local), so nothing outlives init's
# transaction, through PgBouncer in transaction mode too.
LOCK_TIMEOUT: LiteralString = "SELECT set_config('lock_timeout', %(timeout)s, true)"

_RELATION_KINDS = {
    "r": "a table",
    "p": "a partitioned table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
}

Found = Mapping[str, tuple[str, tuple[str, ...]]]
"""What the catalog holds under leaderrun's table names: name -> (kind, columns)."""


def foreign_table(
    schema: str, found: Found, schema_label: str = "--schema"
) -> ForeignTableError | None:
    """The refusal of the first relation under leaderrun's names that is not its.

    A relation is leaderrun's if it is a table with every core column
    (:data:`OWN_TABLE_COLUMNS`); the error names what was found instead.
    """
    for name, core in OWN_TABLE_COLUMNS.items():
        if name not in found:
            continue
        kind, columns = found[name]
        if kind in ("r", "p") and core <= set(columns):
            continue
        what = _RELATION_KINDS.get(kind, "a relation")
        listed = ", ".join(columns) or "none"
        return ForeignTableError(
            f"{schema}.{name} is not leaderrun's table ({what} with columns "
            f"{listed}); leaderrun never alters a table it did not create: pass "
            f"{schema_label} to keep leaderrun's tables in a schema of their own"
        )
    return None


def missing_columns(found: Found) -> dict[str, list[str]]:
    """The columns each of leaderrun's tables found lacks: made by an older version."""
    lacking = {}
    for name, (_, columns) in found.items():
        if missing := [c for c in TABLE_COLUMNS[name] if c not in columns]:
            lacking[name] = missing
    return lacking


def outdated_table(schema: str, name: str, missing: list[str]) -> SchemaMissingError:
    """The hot path's refusal of an own table that only ``init`` may upgrade."""
    return SchemaMissingError(
        f"{schema}.{name} was made by an older leaderrun and lacks the columns "
        f"{', '.join(missing)}; run `leaderrun init --schema {schema}` to upgrade "
        "it, as a role that may alter it (or have a DBA run the SQL that "
        f"`leaderrun init --schema {schema} --print-sql` prints)"
    )


# --- the operators' statements: status, release, and the SQL a DBA runs ---

# One statement, so every row and now() come from one snapshot. The LEFT JOIN
# from a one-row relation returns now() even when there is no row at all.
SNAPSHOT: LiteralString = """
SELECT now() AS db_now, l.*
  FROM (SELECT) AS one
  LEFT JOIN {table} AS l ON %(key)s::bigint IS NULL OR l.lock_key = %(key)s
 ORDER BY l.lock_name NULLS LAST, l.lock_key"""

# One conditional UPDATE decides, so an operator can never free a lease that
# was renewed or taken a moment ago: in READ COMMITTED a row changed under us
# is re-checked on its newest version. An expired lease is cleared (holder NULL,
# so the lock shows as free). With force, a live lease is revoked: the holder
# becomes a marker no holder can match, so the holder's next renewal (a
# compare-and-swap on holder and token) fails and it stops its child; its
# expires_at is kept, so nobody takes the lock before the old holder has had to
# stop its child by its own deadline. The token is never touched: the next
# acquirer gets token + 1.
OPERATOR_RELEASE: LiteralString = """
UPDATE {table} AS l
   SET holder = CASE WHEN l.expires_at <= now() THEN NULL ELSE %(revoked)s END
 WHERE l.lock_key = %(key)s AND l.holder IS NOT NULL
   AND (%(token)s::bigint IS NULL OR l.token = %(token)s)
   AND (l.expires_at <= now() OR (%(force)s AND l.holder <> %(revoked)s))
RETURNING now() AS db_now, l.*"""

OPERATOR_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")
"""What a role that runs, shows and releases leases needs on the table.

INSERT ... ON CONFLICT DO UPDATE needs INSERT and UPDATE; reading the row
needs SELECT. No DELETE: rows are never deleted, and a role that could delete
one could restart a lock's fencing tokens at 1.
"""

RUN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
"""What the same role needs on the run history: the acquire statement prunes it."""

GRANTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (TABLE, OPERATOR_PRIVILEGES),
    (RUN_TABLE, RUN_PRIVILEGES),
)
"""Each of leaderrun's tables and what the running role needs on it."""

DEFAULT_GRANT_ROLE = "leaderrun"
"""The role ``init --print-sql`` grants to unless ``--role`` names another."""


def setup_sql(schema: str, role: str = DEFAULT_GRANT_ROLE) -> str:
    """The SQL a DBA runs once: the tables, their comments, a least-privileged role.

    The role gets USAGE on the schema and SELECT, INSERT, UPDATE on the lease
    table: it can run, show and release leases, but not create or drop the
    table, nor delete leases. On the run history it also gets DELETE, which
    the acquire statement needs to prune it. Needs no connection: identifiers
    are quoted here.
    """
    grantee = sql.Identifier(role)
    statements = [
        *(
            sql.SQL(ddl.strip()).format(
                create=sql.SQL("CREATE TABLE IF NOT EXISTS"), **_tables(schema)
            )
            for ddl in SCHEMA
        ),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(schema), grantee
        ),
        *(
            sql.SQL("GRANT {} ON {} TO {}").format(
                sql.SQL(", ").join(sql.SQL(p) for p in privileges),
                sql.Identifier(schema, name),
                grantee,
            )
            for name, privileges in GRANTED
        ),
    ]
    text = [statement.as_string() + ";" for statement in statements]
    ddl_count = len(SCHEMA)
    return (
        f"-- leaderrun {schema}.{TABLE} and {schema}.{RUN_TABLE}: run once as a "
        f"role that may create tables in {schema}; safe to repeat.\n"
        + "\n".join(text[:ddl_count])
        + f"\n-- The role {role} may run, show and release leases, but not create "
        "the table or delete rows\n-- (a deleted row would restart the lock's "
        "fencing tokens). It prunes its run history itself.\n"
        + "\n".join(text[ddl_count:])
        + "\n"
    )


def missing_table_hint(schema: str, role: str | None) -> str:
    """What to run when the lease table is missing and this role cannot create it."""
    role_flag = f" --role {role}" if role else ""
    return (
        f"run `leaderrun init --schema {schema}` as a role that may create tables "
        f"in {schema}, or have a DBA run the SQL that `leaderrun init --schema "
        f"{schema} --print-sql{role_flag}` prints"
    )


def _tables(schema: str) -> dict[str, sql.Identifier]:
    """The placeholders of this module's statements: each table, quoted."""
    return {
        "table": sql.Identifier(schema, TABLE),
        "runs": sql.Identifier(schema, RUN_TABLE),
    }


def statement(template: LiteralString, schema: str) -> sql.Composed:
    """One of this module's statements, for the tables in ``schema``."""
    return sql.SQL(template).format(create=sql.SQL("CREATE TABLE"), **_tables(schema))


QUERIES: Mapping[str, LiteralString] = {
    "acquire": ACQUIRE,
    "renew": RENEW,
    "release": RELEASE,
    "snapshot": SNAPSHOT,
    "operator_release": OPERATOR_RELEASE,
    "history": HISTORY,
    "last_runs": LAST_RUNS,
    "run_output": RUN_OUTPUT,
}
"""The statement of each query the shared SQL session names (``sql.QUERIES``)."""

QUEUE_QUERIES: Mapping[str, LiteralString] = {
    "acquire_queued": ACQUIRE_QUEUED,
    "leave": LEAVE,
}
"""The queries of PostgreSQL's alone: the ``--wait`` queue (SQLite keeps none)."""

# By oid from the catalog: without USAGE on the schema the table could not be
# named, yet its grants still count. One row per table of GRANTED, in its order,
# after the schema's: (name, the privileges the role lacks on it).
MISSING_GRANTS: LiteralString = """
SELECT NULL::text, ARRAY[]::text[] WHERE NOT has_schema_privilege(%(schema)s, 'USAGE')
UNION ALL
SELECT t.name, ARRAY(
           SELECT p FROM unnest(string_to_array(t.privileges, ',')) AS p,
                  pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = %(schema)s AND c.relname = t.name
              AND NOT has_table_privilege(c.oid, p))
  FROM unnest(%(names)s::text[], %(privileges)s::text[]) AS t(name, privileges)"""
