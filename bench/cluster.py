"""The PostgreSQL a benchmark runs against: the one given, or a throwaway cluster.

The throwaway cluster is the test suite's (tests/pg.py): initdb into a temporary
directory, a free loopback port, removed afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from tests.pg import LocalPgCluster


@contextlib.contextmanager
def postgres(
    dsn: str | None, *, max_connections: int | None = None
) -> Iterator[tuple[str, LocalPgCluster | None]]:
    """The DSN to use, and the throwaway cluster behind it (None if ``dsn`` given).

    ``max_connections`` raises the throwaway server's limit (one restart);
    a given server is used as it is.
    """
    if dsn:
        yield dsn, None
        return
    from tests.pg import LocalPgCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        sys.exit("bench: no initdb/pg_ctl found; install PostgreSQL or pass a DSN")
    cluster = LocalPgCluster(bindir)
    try:
        cluster.create()
        if max_connections is not None:
            with psycopg.connect(cluster.dsn, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET max_connections = {max_connections:d}")
            cluster.restart()
        yield cluster.dsn, cluster
    finally:
        cluster.destroy()
