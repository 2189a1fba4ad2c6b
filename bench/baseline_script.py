"""baseline.py as the figures run it: its statements, its command, its peak RSS.

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
from leaderrun.runs import DEFAULT_HISTORY_KEEP
from leaderrun.stores.postgres_sql import ACQUIRE, RELEASE, statement

SCRIPT = str(Path(__file__).with_name("baseline.py"))
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
        for name, template, given in (
            ("acquire", ACQUIRE, ACQUIRE_PARAMS),
            ("release", RELEASE, RELEASE_PARAMS),
        ):
            # The script adds these; any other is a parameter leaderrun has gained.
            missing = parameters(template) - set(given) - {"key", "token"}
            if missing:
                raise RuntimeError(f"bench: {name} needs {sorted(missing)} too")
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
