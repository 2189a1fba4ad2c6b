"""baseline.py as the figures run it: its statements, its command, its peak RSS.

Also the hand-off's baselines (handoff_baseline.py): their statements, rendered
per hand-off by :func:`handoff_spec`.

baseline.py stays as small as a program that takes and gives back a lease can
be, so it parses nothing: what it runs is rendered here, once per bench run,
into a JSON file it reads. Start-up times it against leaderrun; start-up and
the scale run compare leaderrun's peak RSS with its own, measured once.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.common import admin, peak_rss_kb
from leaderrun.lease import QUEUE_PLACE_LEASES
from leaderrun.runs import DEFAULT_HISTORY_KEEP
from leaderrun.stores.postgres_sql import (
    ACQUIRE,
    ACQUIRE_QUEUED,
    RELEASE,
    release_channel,
    statement,
    wake_channel,
)

SCRIPT = str(Path(__file__).with_name("baseline.py"))
HANDOFF_SCRIPT = str(Path(__file__).with_name("handoff_baseline.py"))
RSS_RUNS = 5

# The parameters of a plain `leaderrun -- true` (no --once-per, the default
# history); the script adds the lock's key, and the token it acquired.
ACQUIRE_PARAMS: dict[str, Any] = {
    "name": None,
    "holder": "baseline",
    "lease_s": 30.0,
    "host": "baseline",
    "pid": 0,
    "command": "true",
    "period_s": None,
    "offset_s": 0.0,
    "retry_failed": False,
    "keep": DEFAULT_HISTORY_KEEP,
    "cadence": None,
    "slot_opens": None,
    "slot_starts": None,
    "slots_until": None,
}
RELEASE_PARAMS: dict[str, Any] = {
    "holder": "baseline",
    "outcome": "ok",
    "exit_status": 0,
    "min_hold_s": 0.0,
    "window_ok": None,
    "started": True,
    "output": None,
    "channel": "baseline",
}


def parameters(template: str) -> set[str]:
    """The names of a statement's bound parameters (``%(name)s``)."""
    return set(re.findall(r"%\((\w+)\)s", template))


def given_all(*statements: tuple[str, str, dict[str, Any]]) -> None:
    """Check that each (name, template, parameters) gives all the template uses.

    The scripts add the lock's key and the token; any other parameter missing
    is one leaderrun's statement has gained since the bench was written.

    Raises:
        RuntimeError: one is missing; the message names the statement and it.
    """
    for name, template, given in statements:
        missing = parameters(template) - set(given) - {"key", "token"}
        if missing:
            raise RuntimeError(f"bench: {name} needs {sorted(missing)} too")


class BaselineScript:
    """baseline.py with its statements, for one bench run; a context manager.

    Nothing touches the database until a figure asks for the command line, so a
    run of figures that need no baseline renders nothing.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.lock_key = random.randrange(1, 2**62)
        self._spec: Path | None = None
        self._rss_kb: float | None = None

    def __enter__(self) -> BaselineScript:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._spec is not None:
            self._spec.unlink(missing_ok=True)

    def argv(self) -> list[str]:
        """The command line that runs the script once: acquire, release, exit."""
        if self._spec is None:
            self._spec = self._render()
        return [sys.executable, SCRIPT, self.dsn, str(self._spec), str(self.lock_key)]

    def peak_rss_kb(self) -> float:
        """The script's peak RSS, in KiB: the median of a few runs, measured once."""
        if self._rss_kb is None:
            argv = self.argv()
            self._rss_kb = statistics.median(peak_rss_kb(argv) for _ in range(RSS_RUNS))
        return self._rss_kb

    def _render(self) -> Path:
        """Write leaderrun's acquire and release, as the server quotes them, to JSON."""
        given_all(
            ("acquire", ACQUIRE, ACQUIRE_PARAMS), ("release", RELEASE, RELEASE_PARAMS)
        )
        spec: dict[str, Any] = {
            "acquire_params": ACQUIRE_PARAMS,
            "release_params": RELEASE_PARAMS,
        }
        with admin(self.dsn) as conn:
            spec["acquire"] = statement(ACQUIRE, "public").as_string(conn)
            spec["release"] = statement(RELEASE, "public").as_string(conn)
        path = Path(tempfile.mkstemp(prefix="bench-sql-", suffix=".json")[1])
        path.write_text(json.dumps(spec))
        return path


FLOOR_TABLE = "leaderrun_bench_floor"
"""The smallest lease hand-off's table; :func:`drop_floor` drops it."""

_FLOOR = {
    "create": f"""CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (
        lock_key bigint PRIMARY KEY, holder text, next text)""",
    "acquire": f"""INSERT INTO {FLOOR_TABLE} VALUES (%(key)s, %(holder)s, NULL)
        ON CONFLICT (lock_key) DO UPDATE SET holder = excluded.holder
        WHERE {FLOOR_TABLE}.holder IS NULL RETURNING true, 0""",
    # The waiter names itself the next holder; the holder's release grants it.
    "queue": f"""UPDATE {FLOOR_TABLE} SET next = %(holder)s
        WHERE lock_key = %(key)s RETURNING holder IS NULL, 0""",
    "release": f"""WITH u AS (UPDATE {FLOOR_TABLE} SET holder = next, next = NULL
        WHERE lock_key = %(key)s AND holder = %(holder)s RETURNING holder)
        SELECT pg_notify('bench:' || u.holder, '') FROM u WHERE u.holder IS NOT NULL""",
}

_SESSION = {
    "acquire": "SELECT pg_try_advisory_lock(%(key)s), 0",
    "take": "SELECT true, 0 FROM pg_advisory_lock(%(key)s)",
    "release": "SELECT pg_advisory_unlock(%(key)s)",
}

HANDOFF_KINDS = ("leaderrun", "smallest", "session")
"""The hand-off baselines: see :func:`handoff_spec`."""


def handoff_spec(dsn: str, key: int, kind: str) -> Path:
    """The statements handoff_baseline.py hands lock ``key`` on with, as JSON.

    ``leaderrun``: leaderrun's own: the holder's acquire and release, the
    waiter's LISTEN on its wake channel and its queued acquire, before and
    after the wake-up, as a plain run and a ``--wait`` run send them.
    ``smallest``: the smallest lease hand-off PostgreSQL allows: one-line
    statements on a table of three columns, and the release grants the lease
    to the waiter itself, so the waiter sends nothing between its wake-up and
    its command's start. ``session``: no lease at all, a session advisory lock
    the waiter's statement waits for in the server (what leaderrun's design
    rules out: the lock lives as long as a connection, ``no-session-state``);
    the fastest hand-off PostgreSQL has.
    """
    hold = {**ACQUIRE_PARAMS, "holder": "baseline-hold"}
    wait = {**ACQUIRE_PARAMS, "holder": "baseline-wait"}
    with admin(dsn) as conn:
        if kind == "session":
            spec: dict[str, Any] = {**_SESSION, "queue": None, "listen": None}
        elif kind == "smallest":
            conn.execute(_FLOOR["create"])
            spec = {
                **{name: _FLOOR[name] for name in ("acquire", "queue", "release")},
                "take": None,
                "listen": 'LISTEN "bench:baseline-wait"',
            }
        elif kind == "leaderrun":
            channel = wake_channel("baseline-wait")
            wait.update(channel=channel, place_s=QUEUE_PLACE_LEASES * wait["lease_s"])
            given_all(
                ("queued acquire", ACQUIRE_QUEUED, wait),
                ("release", RELEASE, RELEASE_PARAMS),
            )
            queued = statement(ACQUIRE_QUEUED, "public").as_string(conn)
            spec = {
                "acquire": statement(ACQUIRE, "public").as_string(conn),
                "queue": queued,
                "take": queued,
                "release": statement(RELEASE, "public").as_string(conn),
                "listen": f'LISTEN "{channel}"',
            }
        else:
            raise ValueError(f"bench: no hand-off baseline {kind!r}: {HANDOFF_KINDS}")
    spec["hold"], spec["wait"] = hold, wait
    # Each role's release adds its own holder to these (its acquire's
    # channel, the wake channel, is not the release's: the lock's).
    spec["ending"] = {
        **{k: v for k, v in RELEASE_PARAMS.items() if k != "holder"},
        "channel": release_channel("public", key),
    }
    path = Path(tempfile.mkstemp(prefix="bench-handoff-", suffix=".json")[1])
    path.write_text(json.dumps(spec))
    return path


def handoff_argv(dsn: str, spec: Path, key: int, role: str) -> list[str]:
    """handoff_baseline.py's command line up to its command; ``role``: hold, wait."""
    return [sys.executable, HANDOFF_SCRIPT, dsn, str(spec), str(key), role]


def drop_floor(dsn: str) -> None:
    """Drop the smallest hand-off's table, if a figure made it."""
    with admin(dsn) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {FLOOR_TABLE}")
