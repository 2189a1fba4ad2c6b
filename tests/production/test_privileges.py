"""Least privilege: a role with only the operator grants runs; without, it is told.

The grants are ``USAGE`` on the schema and ``SELECT, INSERT, UPDATE`` on the
table (``leaderrun.stores.postgres.OPERATOR_PRIVILEGES``): no CREATE, and no DELETE,
which could restart a lock's fencing tokens at 1.
"""

from __future__ import annotations

import pytest

from tests.production.operations import status_release_history

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]


def test_a_role_with_only_the_operator_grants_runs_and_waits(operator, lock_name):
    """Acquire, renew, release and --wait all work with the grants alone."""
    runner = operator.leaderrun(operator.role(), lock_name)
    try:
        first = runner.run("--", "sh", "-c", "echo $LEADERRUN_FENCING_TOKEN")
        assert (first.returncode, first.stdout, first.stderr) == (0, "1\n", "")
        second = runner.run(
            "--lease-duration", "4s", "--wait", "--", "sh", "-c", "sleep 1.5; echo ok"
        )
        assert (second.returncode, second.stdout, second.stderr) == (0, "ok\n", "")
    finally:
        runner.kill_all()


def test_the_role_shows_releases_and_reads_history(operator, lock_name):
    """status, release --force and history work with the grants alone."""
    runner = operator.leaderrun(operator.role(), lock_name)
    try:
        status_release_history(runner, operator.schema)
    finally:
        runner.kill_all()


def test_the_role_cannot_delete_rows(operator, pg_admin, lock_name):
    """DELETE is not among the grants: the fencing token cannot be reset."""
    role = operator.role()
    runner = operator.leaderrun(role, lock_name)
    assert runner.run("--", "true").returncode == 0
    with pg_admin() as conn:
        conn.execute(f'SET ROLE "{role}"')
        with pytest.raises(Exception, match="permission denied"):
            conn.execute(f'DELETE FROM "{operator.schema}".leader_lease')


@pytest.mark.parametrize(
    ("revoked", "expected"),
    [
        ("UPDATE", 'GRANT UPDATE ON "{schema}"."leader_lease" TO "{role}"'),
        ("SELECT, INSERT", 'GRANT SELECT, INSERT ON "{schema}"."leader_lease" TO'),
        ("USAGE", 'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'),
    ],
)
def test_a_missing_grant_is_named(operator, lock_name, revoked, expected):
    """Without one grant, exit 69 in one line that gives the exact GRANT to run."""
    grants = operator.grants()
    if revoked == "USAGE":
        grants = grants[1:]
    else:
        kept = [p for p in ("SELECT", "INSERT", "UPDATE") if p not in revoked]
        grants = [
            grants[0],
            grants[1].replace("SELECT, INSERT, UPDATE", ", ".join(kept)),
            *grants[2:],  # the run history's
        ]
    role = operator.role(grants=grants)
    result = operator.leaderrun(role, lock_name).run("--", "echo", "ran")
    assert result.returncode == 69
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert expected.format(schema=operator.schema, role=role) in result.stderr
    if revoked == "USAGE":  # the table grants are there: only USAGE is asked for
        assert 'ON "' + operator.schema + '"."leader_lease"' not in result.stderr
        assert 'ON "' + operator.schema + '"."leader_run"' not in result.stderr


def test_a_missing_history_grant_is_named(operator, lock_name):
    """Without the run history's grants: exit 69, naming exactly those."""
    role = operator.role(grants=operator.grants()[:2])
    result = operator.leaderrun(role, lock_name).run("--", "echo", "ran")
    assert (result.returncode, result.stdout) == (69, "")
    expected = (
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{operator.schema}"."leader_run" '
        f'TO "{role}"'
    )
    assert expected in result.stderr
    assert '"leader_lease" TO' not in result.stderr
