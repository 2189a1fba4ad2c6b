"""The PostgreSQL fixtures give a working server, version 15 or newer."""

import psycopg
import pytest

pytestmark = pytest.mark.pg


def test_pg_dsn_answers_a_query(pg_dsn):
    """A connection made from pg_dsn alone runs a query."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_is_postgresql_15_or_newer(pg_admin):
    """The server is recent enough for leaderrun (15 and up)."""
    with pg_admin() as conn:
        assert conn.autocommit
        assert conn.info.server_version >= 150000


def test_local_cluster_listens_on_tcp_loopback(pg_cluster):
    """The local cluster answers on TCP 127.0.0.1, where fault tests put a proxy."""
    if not pg_cluster.local:
        pytest.skip("only the local cluster itself listens on 127.0.0.1")
    tcp = f"host=127.0.0.1 port={pg_cluster.port} dbname=postgres user=postgres"
    with psycopg.connect(tcp) as conn:
        row = conn.execute("SELECT host(inet_server_addr()), inet_server_port()")
        assert row.fetchone() == ("127.0.0.1", pg_cluster.port)


def test_own_server_restarts_on_the_same_port(pg_cluster, pg_admin):
    """A restart, even after a crash-like stop, keeps the address clients know."""
    if not pg_cluster.restartable:
        pytest.skip("only a server this session started can be restarted")
    port = pg_cluster.port
    pg_cluster.restart("immediate")
    assert pg_cluster.port == port
    with pg_admin() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
