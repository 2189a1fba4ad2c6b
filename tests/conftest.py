"""Settings for the whole test suite, applied before any test module imports leaderrun.

The environment is scrubbed at import time, so that a developer's own leaderrun or
libpq settings (``LEADERRUN_*``, ``LE_*``, ``PG*``, ``DATABASE_URL``) cannot leak
into a test and make it pass or fail for reasons the test does not show. Tests
that need a setting pass it explicitly; the database fixtures use explicit DSNs.
"""

import os

pytest_plugins = [
    "tests.pg",
    "tests.stores",
    "tests.helpers.faketime",
    "tests.helpers.stamper",
]

# The suite's own inputs, read by tests/pg.py and tests/pg_container.py (the
# defaults of --pg-dsn and --pg-route, and the container image); leaderrun itself
# never reads them.
_KEPT = frozenset(
    {"LEADERRUN_TEST_DSN", "LEADERRUN_TEST_PG_ROUTE", "LEADERRUN_TEST_PG_IMAGE"}
)
_SCRUBBED_PREFIXES = ("LEADERRUN_", "LE_", "PG")

for _name in list(os.environ):
    if _name in _KEPT:
        continue
    if _name.startswith(_SCRUBBED_PREFIXES) or _name == "DATABASE_URL":
        del os.environ[_name]

# typer reads these once, when it is imported: a wide, plain terminal keeps help and
# error text the same on every machine, so tests can compare it.
os.environ["TERMINAL_WIDTH"] = "200"
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"
