"""Every file in examples/cron/ is parsed and its leaderrun command run, so none rots.

The commands run as written, against the test database, with two substitutions
only: ``leaderrun`` is this checkout's (``python -m leaderrun``), and the job
after ``--`` is a harmless stand-in. The connection comes the way the examples
say it does: a libpq service file named by ``PGSERVICE``, or ``LEADERRUN_DSN``.
Each test runs in a schema of its own (``LEADERRUN_SCHEMA``), so the examples'
fixed lock names cannot meet another test's.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from tests.acceptance.conftest import child, readline
from tests.pg import find_bindir

pytestmark = [pytest.mark.pg, pytest.mark.slow]

Admin = Callable[[], psycopg.Connection[TupleRow]]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cron"
LEADERRUN = [sys.executable, "-m", "leaderrun"]
# One field of a crontab time spec: *, */5, 1-5, 1,15, 2-10/2 ...
_CRON_FIELD = re.compile(r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture
def schema(pg_dsn: str, pg_admin: Admin) -> Iterator[str]:
    name = f"lr_ex_{uuid.uuid4().hex[:10]}"
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def service_env(pg_dsn: str, schema: str, tmp_path: Path) -> dict[str, str]:
    """An environment in which ``PGSERVICE=leaderrun`` reaches the test database."""
    params = conninfo_to_dict(pg_dsn)
    service_file = tmp_path / "pg_service.conf"
    lines = ["[leaderrun]", *(f"{k}={v}" for k, v in params.items() if v is not None)]
    service_file.write_text("\n".join(lines) + "\n")
    return {
        "PGSERVICEFILE": str(service_file),
        "LEADERRUN_SCHEMA": schema,
        "HOME": str(tmp_path),
    }


def leaderrun_argv(command: str, job: list[str]) -> list[str]:
    """An example's leaderrun command line, with this checkout and ``job``."""
    argv = shlex.split(command)
    assert Path(argv[0]).name == "leaderrun", command
    assert "--" in argv, f"no -- before the job: {command}"
    options = argv[1 : argv.index("--")]
    original_job = argv[argv.index("--") + 1 :]
    assert original_job, command
    return [*LEADERRUN, *options, "--", *job]


def run(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], **env},
        **kw,
    )


def hold(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``argv`` (a leaderrun of the handshake child) and wait until it runs."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
    )
    assert proc.stdout is not None
    assert readline(proc.stdout).startswith("ready")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=30)


# --- crontab ----------------------------------------------------------------------


def crontab_jobs() -> tuple[dict[str, str], list[str]]:
    """The crontab's variable assignments, and the command of each job line."""
    env: dict[str, str] = {}
    commands: list[str] = []
    for line in (EXAMPLES / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.fullmatch(r"[A-Z_]+=\S*", line):
            key, value = line.split("=", 1)
            env[key] = value
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, line
        for field in fields[:5]:
            assert _CRON_FIELD.fullmatch(field), (field, line)
        commands.append(fields[5])
    return env, commands


def test_crontab_jobs_run_on_one_node_and_skip_silently_on_the_others(service_env):
    cron_env, commands = crontab_jobs()
    assert cron_env["PGSERVICE"] == "leaderrun"
    assert len(commands) >= 2
    env = {**service_env, "PGSERVICE": cron_env["PGSERVICE"]}
    for command in commands:
        ran = run(leaderrun_argv(command, ["echo", "ran"]), env)
        assert (ran.returncode, ran.stdout, ran.stderr) == (0, "ran\n", ""), command
        # Another node holds the lock: exit 75, and nothing for cron to mail.
        holder = hold(leaderrun_argv(command, child()), env)
        try:
            skipped = run(leaderrun_argv(command, ["echo", "ran"]), env)
        finally:
            stop(holder)
        assert (skipped.returncode, skipped.stdout, skipped.stderr) == (75, "", "")


# --- systemd ----------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((EXAMPLES / name).read_text())
    return parser


def test_systemd_units_are_well_formed():
    service, timer = unit("leaderrun-backup.service"), unit("leaderrun-backup.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert "75" in service["Service"]["SuccessExitStatus"].split()
    assert service["Service"]["KillMode"] == "mixed"
    assert shlex.split(service["Service"]["ExecStart"])[0].endswith("/leaderrun")
    # The timer starts the service of its own name on every node.
    assert "Unit" not in timer["Timer"]
    assert timer["Timer"]["OnCalendar"]
    assert timer["Timer"]["Persistent"] == "false"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_service_command_runs_and_a_skip_is_a_success(service_env):
    service = unit("leaderrun-backup.service")["Service"]
    env = dict(service_env)
    for assignment in shlex.split(service["Environment"]):
        key, value = assignment.split("=", 1)
        env[key] = value
    success = {0, *map(int, service["SuccessExitStatus"].split())}
    command = service["ExecStart"]
    ran = run(leaderrun_argv(command, ["true"]), env)
    assert ran.returncode == 0, ran.stderr
    holder = hold(leaderrun_argv(command, child()), env)
    try:
        skipped = run(leaderrun_argv(command, ["true"]), env)
    finally:
        stop(holder)
    assert skipped.returncode == 75
    assert skipped.returncode in success


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing; .ci/run installs systemd")
        pytest.skip("systemd-analyze is not installed")
    for name in ("leaderrun-backup.service", "leaderrun-backup.timer"):
        text = (EXAMPLES / name).read_text()
        # verify checks that ExecStart's programs exist; these do everywhere.
        text = re.sub(r"/usr/local/bin/\S+", "/bin/true", text)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "leaderrun-backup.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # verify only warns (exit 0) about unknown keys: any output is a failure.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# --- CI ---------------------------------------------------------------------------


def ci_commands(name: str) -> list[str]:
    text = (EXAMPLES / name).read_text()
    return re.findall(r"^\s*(?:run:|-)\s+(leaderrun\s.*)$", text, re.MULTILINE)


@pytest.mark.parametrize("name", ["github-actions-deploy.yml", "gitlab-ci.yml"])
def test_ci_deploys_wait_for_each_other_and_never_overlap(
    name, pg_dsn, schema, tmp_path
):
    (command,) = ci_commands(name)
    assert "--wait-timeout" in shlex.split(command)
    # A waiter sleeps until the holder's lease would end (no notification):
    # a short lease, through its environment twin, keeps the test short.
    env = {
        "LEADERRUN_DSN": pg_dsn,
        "LEADERRUN_SCHEMA": schema,
        "LEADERRUN_LEASE_DURATION": "4s",
    }
    events = tmp_path / "events"
    job = child("--events", str(events), "--exit-after", "1.0")
    deploys = [
        subprocess.Popen(
            leaderrun_argv(command, job),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ["PATH"], **env},
        )
        for _ in range(2)
    ]
    try:
        results = [proc.communicate(timeout=60) for proc in deploys]
    finally:
        for proc in deploys:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in deploys] == [0, 0], results
    spans: dict[str, list[float]] = {}
    for line in events.read_text().splitlines():
        _, token, _, at = line.split()
        spans.setdefault(token, []).append(float(at))
    assert sorted(spans) == ["1", "2"]
    assert max(spans["1"]) <= min(spans["2"])  # the second waited for the first


# --- the fenced job ---------------------------------------------------------------


def test_fenced_job_writes_with_its_token_and_rejects_a_stale_one(
    service_env, schema, pg_admin
):
    script = EXAMPLES / "fenced-job.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    bindir = find_bindir()
    assert bindir is not None
    assert (bindir / "psql").is_file()
    env = {
        **service_env,
        "PGSERVICE": "leaderrun",
        "PATH": f"{bindir}:{os.environ['PATH']}",
        # The job's table goes in this test's schema.
        "PGOPTIONS": f"-c search_path={schema}",
    }
    argv = leaderrun_argv(f"leaderrun --lock-id daily-report -- {script}", [])
    first = run([*argv, str(script), "first"], env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "fenced-job: wrote first with fencing token 1\n"

    # A holder that lost its lease and comes back late, with token 0 < 1.
    stale = run([str(script), "stale"], {**env, "LEADERRUN_FENCING_TOKEN": "0"})
    assert stale.returncode == 1
    assert "fencing token 0 is stale" in stale.stderr

    second = run([*argv, str(script), "second"], env)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "fenced-job: wrote second with fencing token 2\n"
    with pg_admin() as conn:
        row = conn.execute(
            sql.SQL("SELECT result, fence FROM {}").format(
                sql.Identifier(schema, "daily_report")
            )
        ).fetchall()
    assert row == [("second", 2)]

    unguarded = run([str(script)], env)
    assert unguarded.returncode != 0
    assert "run this under leaderrun" in unguarded.stderr
