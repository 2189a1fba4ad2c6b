"""Secrets: a password reaches the server and nothing else.

The role here authenticates with SCRAM (a pg_hba line added for the members of
one group role), so the password is really used. Every output of succeeding and
failing runs (stdout, stderr at -vv, JSON logs, the child's environment, the
lease row, ``--help``, ``ps``) is searched for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg import sql

from leaderrun.stores.postgres_sql import OPERATOR_PRIVILEGES, RUN_PRIVILEGES
from tests.pg import LOOPBACK, PgCluster

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]

SCRAM_GROUP = "leaderrun_scram_users"
# Characters that need quoting in a URI and in key=value form, so that every
# spelling of the password is exercised. The outputs are searched for the
# random core, which every spelling (quoted, escaped, percent-encoded) keeps.
SECRET_CORE = uuid.uuid4().hex
PASSWORD = f"s3cr3t{SECRET_CORE}p@ss w0rd/'x"
WRONG_CORE = uuid.uuid4().hex
WRONG_PASSWORD = f"wr0ng{WRONG_CORE}"


@pytest.fixture(scope="module")
def scram_role(pg_cluster: PgCluster, pg_admin) -> Iterator[str]:
    """A login role that must present PASSWORD over TCP (scram-sha-256)."""
    if not pg_cluster.local:
        pytest.skip("needs the throwaway cluster: the test edits its pg_hba.conf")
    assert pg_cluster.datadir is not None
    role = f"lr_scram_{uuid.uuid4().hex[:8]}"
    init = leaderrun_argv("init", "--dsn", pg_cluster.dsn)
    subprocess.run(init, check=True, capture_output=True, timeout=60)
    hba = pg_cluster.datadir / "pg_hba.conf"
    with pg_admin() as conn:
        if not conn.execute(
            "SELECT FROM pg_roles WHERE rolname = %s", (SCRAM_GROUP,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(SCRAM_GROUP)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(role), sql.Literal(PASSWORD), sql.Identifier(SCRAM_GROUP)
            )
        )
        for grant in (
            "GRANT USAGE ON SCHEMA public TO {}",
            f"GRANT {', '.join(OPERATOR_PRIVILEGES)} ON public.leader_lease TO {{}}",
            f"GRANT {', '.join(RUN_PRIVILEGES)} ON public.leader_run TO {{}}",
        ):
            conn.execute(sql.SQL(grant).format(sql.Identifier(role)))
        text = hba.read_text()
        line = f"host all +{SCRAM_GROUP} {LOOPBACK}/32 scram-sha-256\n"
        if line not in text:
            hba.write_text(line + text)  # first match wins: before the trust lines
            conn.execute("SELECT pg_reload_conf()")
    yield role
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def leaderrun_argv(*args: str) -> list[str]:
    """``python -m leaderrun`` with ``args``."""
    return [sys.executable, "-m", "leaderrun", *args]


def kv_dsn(role: str, port: int, password: str) -> str:
    """key=value form, the password quoted as libpq wants it."""
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    return (
        f"host={LOOPBACK} port={port} dbname=postgres user={role} password='{quoted}'"
    )


def uri_dsn(role: str, port: int, password: str) -> str:
    """URI form, the password percent-encoded."""
    return f"postgresql://{role}:{quote(password, safe='')}@{LOOPBACK}:{port}/postgres"


# What the child prints: its environment, then the command line of its parent
# (leaderrun itself), as ps would show it.
DUMP = "env; echo ---; tr '\\0' ' ' < /proc/$PPID/cmdline; echo"

WAYS = [
    "--dsn uri",
    "--dsn key=value",
    "LEADERRUN_DSN",
    "LEADERRUN_DSN_FILE",
    "PGPASSFILE",
    "service file",
]


def configure(
    way: str, role: str, port: int, password: str, tmp: Path
) -> tuple[list[str], dict[str, str]]:
    """The leaderrun arguments and environment that pass ``password`` that way."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PG", "LEADERRUN_"))
    }
    env.pop("DATABASE_URL", None)
    plain = f"host={LOOPBACK} port={port} dbname=postgres user={role}"
    if way == "--dsn uri":
        return ["--dsn", uri_dsn(role, port, password)], env
    if way == "--dsn key=value":
        return ["--dsn", kv_dsn(role, port, password)], env
    if way == "LEADERRUN_DSN":
        return [], {**env, "LEADERRUN_DSN": kv_dsn(role, port, password)}
    if way == "LEADERRUN_DSN_FILE":
        path = tmp / "dsn"
        path.write_text(uri_dsn(role, port, password) + "\n")
        path.chmod(0o600)
        return [], {**env, "LEADERRUN_DSN_FILE": str(path)}
    passfile = tmp / "pgpass"
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"{LOOPBACK}:{port}:postgres:{role}:{escaped}\n")
    passfile.chmod(0o600)
    env["PGPASSFILE"] = str(passfile)
    if way == "PGPASSFILE":
        return ["--dsn", plain], env
    assert way == "service file"
    services = tmp / "pg_service.conf"
    services.write_text(
        f"[leaderrun]\nhost={LOOPBACK}\nport={port}\ndbname=postgres\nuser={role}\n"
    )
    env["PGSERVICEFILE"] = str(services)
    env["PGSERVICE"] = "leaderrun"
    return [], env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        leaderrun_argv(*args),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def assert_secret_free(result: subprocess.CompletedProcess[str]) -> None:
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        for core in (SECRET_CORE, WRONG_CORE):
            assert core not in text, f"a password is in {name}:\n{text}"


@pytest.mark.parametrize("way", WAYS)
def test_password_appears_in_no_output(
    scram_role, pg_cluster, pg_admin, tmp_path, way, lock_name
):
    """Succeeding and failing runs, text and JSON, -vv: the password is nowhere."""
    args, env = configure(way, scram_role, pg_cluster.port, PASSWORD, tmp_path)
    on_command_line = (
        way.startswith("--dsn") and "password" in " ".join(args)
    ) or "@" in " ".join(args)
    for log_format in ("text", "json"):
        ok = run(
            [
                *args,
                "--lock-id",
                lock_name,
                "-vv",
                "--log-format",
                log_format,
                "--",
                "sh",
                "-c",
                DUMP,
            ],
            env,
        )
        assert ok.returncode == 0, ok.stderr
        child_env, _, parent_cmdline = ok.stdout.partition("---\n")
        assert "LEADERRUN_FENCING_TOKEN=" in child_env  # it did dump the environment
        assert "released" in ok.stderr  # and -vv logged the whole run
        assert_secret_free(
            subprocess.CompletedProcess(ok.args, 0, child_env, ok.stderr)
        )
        if not on_command_line:  # what ps shows: nothing secret
            assert SECRET_CORE not in parent_cmdline
    with pg_admin() as conn:  # the row and the server's view of the session
        row = conn.execute(
            "SELECT row_to_json(l)::text FROM leader_lease l WHERE lock_name = %s",
            (lock_name,),
        ).fetchone()
        assert row is not None
        assert SECRET_CORE not in row[0]
    # Failing runs: a wrong password, an unknown database, an unknown option, a
    # bad flag, a held lock; each in text and JSON, at -vv (with tracebacks).
    wrong_args, wrong_env = configure(
        way, scram_role, pg_cluster.port, WRONG_PASSWORD, tmp_path
    )
    failures = [
        (wrong_args, wrong_env, 69, "password authentication failed"),
        ([*args, "--lease-duration", "nonsense"], env, 64, "nonsense"),
    ]
    if way.startswith("--dsn"):
        failures.append(
            (
                [
                    args[0],
                    args[1]
                    .replace("/postgres", "/nodb")
                    .replace("dbname=postgres", "dbname=nodb"),
                ],
                env,
                69,
                "nodb",
            )
        )
    if way == "--dsn key=value":
        failures.append(
            ([args[0], args[1] + " bogus_option=1"], env, 64, "bogus_option")
        )
    for fargs, fenv, code, needle in failures:
        for log_format in ("text", "json"):
            result = run(
                [
                    *fargs,
                    "--lock-id",
                    lock_name,
                    "-vv",
                    "--log-format",
                    log_format,
                    "--",
                    "echo",
                    "ran",
                ],
                fenv,
            )
            assert (result.returncode, result.stdout) == (code, ""), result.stderr
            assert needle in result.stderr
            assert_secret_free(result)


def test_help_never_shows_the_dsn(tmp_path):
    """--help with a password in LEADERRUN_DSN and DATABASE_URL shows neither."""
    env = {
        **os.environ,
        "LEADERRUN_DSN": f"password={PASSWORD}",
        "DATABASE_URL": uri_dsn("u", 1, PASSWORD),
    }
    for args in (["--help"], ["run", "--help"], ["init", "--help"]):
        result = run(args, env)
        assert result.returncode == 0
        assert "--dsn" in result.stdout or args == ["--help"]
        assert_secret_free(result)


@pytest.mark.parametrize(
    ("mode", "content", "needle"),
    [
        (
            0o644,
            "host=x",
            "has mode 0644, so other users may read its password; run chmod 600",
        ),
        (0o640, "host=x", "has mode 0640"),
        (0o600, "  \n", "is empty"),
        (None, "", "cannot be read: No such file or directory"),
    ],
)
def test_an_unsafe_or_unusable_dsn_file_is_refused(tmp_path, mode, content, needle):
    """Exit 64 in one line naming the file and what to do; nothing is run."""
    path = tmp_path / "dsn"
    if mode is not None:
        path.write_text(content)
        path.chmod(mode)
    env = {**os.environ, "LEADERRUN_DSN_FILE": str(path)}
    result = run(["--lock-id", "x", "--", "echo", "ran"], env)
    assert (result.returncode, result.stdout) == (64, "")
    assert (
        result.stderr
        == f"leaderrun: LEADERRUN_DSN_FILE {str(path)!r} {needle}"
        + result.stderr.split(needle, 1)[1]
    )
    assert len(result.stderr.splitlines()) == 1
