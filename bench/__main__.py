"""``python -m bench``: leaderrun's cost and speed, each against a baseline.

Runs against a throwaway PostgreSQL cluster (``initdb``/``pg_ctl``, as the test
suite does) or ``--dsn``, and writes ``bench/RESULTS.md`` with the machine
described. Every figure is measured in the same run as its baseline.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cluster import postgres  # noqa: E402
from leaderrun import __version__  # noqa: E402
from leaderrun.runs import DEFAULT_HISTORY_KEEP  # noqa: E402
from leaderrun.stores.postgres import PostgresLeaseStore  # noqa: E402
from leaderrun.stores.postgres_sql import (  # noqa: E402
    ACQUIRE,
    RELEASE,
    setup_sql,
    statement,
)

BIN = Path(sys.executable).parent
LEADERRUN = str(BIN / "leaderrun")
BASELINE = str(Path(__file__).with_name("baseline.py"))
LINE_TIMEOUT_S = 120.0


# --- processes ---------------------------------------------------------------


@dataclass
class Finished:
    """A process that ended: its status, wall time and CPU time."""

    status: int
    wall_s: float
    cpu_s: float


def run_timed(argv: list[str], env: dict[str, str] | None = None) -> Finished:
    """Run ``argv`` to the end; measure it with wait4's rusage (this child only)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(proc.returncode, wall_s, usage.ru_utime + usage.ru_stime)


# ru_maxrss from wait4 is useless for a child of a large process: Linux carries
# the parent's high-water mark across the child's execve. A small launcher that
# forks (fresh accounting) and execs the command gives the command's own peak.
_LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"maxrss {usage.ru_maxrss}\\n")
os._exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_kb(argv: list[str]) -> int:
    """The peak RSS of ``argv`` run to the end, in KiB."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCH, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    return int(done.stderr.rsplit("maxrss ", 1)[1])


def vm_hwm_kb(pid: int) -> int | None:
    """A live process's peak RSS so far (VmHWM), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def lr(dsn: str, lock: str, *args: str) -> list[str]:
    """A leaderrun command line."""
    return [LEADERRUN, "--dsn", dsn, "--lock-id", lock, *args]


def readline(stream: IO[str], timeout_s: float = LINE_TIMEOUT_S) -> str:
    """One line, or fail instead of hanging."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"no line within {timeout_s}s")
    return stream.readline()


def wait_for(stream: IO[str], needle: str) -> str:
    """Read lines until one contains ``needle``; return them."""
    seen = []
    while True:
        line = readline(stream)
        if not line:
            raise RuntimeError(f"{needle!r} never came: {''.join(seen)}")
        seen.append(line)
        if needle in line:
            return "".join(seen)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM a leaderrun (it forwards to its child) and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


# --- the database ------------------------------------------------------------


def admin(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, application_name="bench")


def server_cpu_s(cluster: Any) -> float | None:
    """CPU seconds used so far by the local server, its exited and live backends."""
    if cluster is None:
        return None
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()

    mine = fields(pid)
    total = sum(int(x) for x in mine[11:15])  # utime stime cutime cstime
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += sum(int(x) for x in fields(int(child))[11:13])
    return total / tick


# --- figures -----------------------------------------------------------------


@dataclass
class Results:
    """Every figure, with the lines of RESULTS.md it becomes."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: str, baseline: str, goal: str, met: str) -> None:
        self.rows.append((figure, value, baseline, goal, met))
        print(f"  {figure}: {value} (baseline {baseline}; goal {goal}: {met})")


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def bench_startup(dsn: str, runs: int, out: Results) -> float:
    """leaderrun -- true against the minimal psycopg script; returns its peak RSS."""
    print(f"start-up: {runs} runs each, interleaved")
    # The statements and parameters of a plain `leaderrun -- true`.
    statements: dict[str, Any] = {
        "acquire_params": {
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
        },
        "release_params": {
            "holder": "baseline",
            "outcome": "ok",
            "exit_status": 0,
            "min_hold_s": 0.0,
            "window_ok": None,
            "channel": "baseline",
        },
    }
    with admin(dsn) as conn:
        PostgresLeaseStore(dsn).init()
        for name, template in (("acquire", ACQUIRE), ("release", RELEASE)):
            statements[name] = statement(template, "public").as_string(conn)
    sql_file = Path(tempfile.mkstemp(prefix="bench-sql-", suffix=".json")[1])
    sql_file.write_text(json.dumps(statements))
    lock_key = random.randrange(1, 2**62)
    commands = {
        "leaderrun": lr(dsn, "bench-startup", "--", "true"),
        "baseline": [sys.executable, BASELINE, dsn, str(sql_file), str(lock_key)],
        "import psycopg": [sys.executable, "-c", "import psycopg"],
        "leaderrun --help": [LEADERRUN, "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    timings: dict[str, list[Finished]] = {name: [] for name in commands}
    for _ in range(2):  # warm the page cache and the server's catalog caches
        for argv in commands.values():
            run_timed(argv)
    for i in range(runs):
        order = list(commands.items())
        if i % 2:
            order.reverse()
        for name, argv in order:
            done = run_timed(argv)
            if done.status != 0:
                raise RuntimeError(f"{name} exited {done.status}")
            timings[name].append(done)
    wall = {n: median_ms([t.wall_s for t in ts]) for n, ts in timings.items()}
    cpu = {n: median_ms([t.cpu_s for t in ts]) for n, ts in timings.items()}
    ratio = wall["leaderrun"] / wall["baseline"]
    cpu_ratio = cpu["leaderrun"] / cpu["baseline"]
    out.add(
        f"start-up, `leaderrun --lock-id X -- true` (median wall of {runs})",
        f"{wall['leaderrun']:.0f} ms",
        f"{wall['baseline']:.0f} ms",
        "ratio <= 1.15",
        f"{ratio:.2f}: {verdict(ratio <= 1.15)}",
    )
    out.add(
        f"start-up, CPU time (median of {runs})",
        f"{cpu['leaderrun']:.0f} ms",
        f"{cpu['baseline']:.0f} ms",
        "(same ratio)",
        f"{cpu_ratio:.2f}",
    )
    out.add(
        "`leaderrun --help` (median wall)",
        f"{wall['leaderrun --help']:.0f} ms",
        f"`import psycopg` {wall['import psycopg']:.0f} ms, "
        f"`python -c pass` {wall['python -c pass']:.0f} ms",
        "no psycopg, no rich",
        "yes (tests/unit/test_lean_startup.py)",
    )
    rss = statistics.median(peak_rss_kb(commands["baseline"]) for _ in range(5))
    lr_rss = statistics.median(peak_rss_kb(commands["leaderrun"]) for _ in range(5))
    sql_file.unlink()
    out.notes.append(
        f"Peak RSS of one `leaderrun -- true`: {lr_rss / 1024:.1f} MiB; of the "
        f"baseline script: {rss / 1024:.1f} MiB (medians of 5)."
    )
    return rss


def handoff_round(
    dsn: str, waiter_dsn: str, lock: str, lease: str
) -> tuple[float, str]:
    """Holder's child exits -> waiter's child starts, in s; and the waiter's log."""
    holder = subprocess.Popen(
        [
            *lr(dsn, lock, "--lease-duration", lease, "--"),
            "sh",
            "-c",
            "echo ready; read x; exec date +%s%N",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    waiter = None
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        if readline(holder.stdout).strip() != "ready":
            raise RuntimeError("the holder did not start its child")
        waiter = subprocess.Popen(
            lr(waiter_dsn, lock, "--wait", "-vv", "--", "date", "+%s%N"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert waiter.stdout is not None
        assert waiter.stderr is not None
        early = wait_for(waiter.stderr, "is held; retrying")
        holder.stdin.write("go\n")
        holder.stdin.flush()
        ended_ns = int(readline(holder.stdout))
        started_ns = int(readline(waiter.stdout))
        _, log = waiter.communicate(timeout=LINE_TIMEOUT_S)
        if waiter.returncode != 0 or holder.wait(timeout=LINE_TIMEOUT_S) != 0:
            raise RuntimeError(f"hand-off run failed: {log}")
        return (started_ns - ended_ns) / 1e9, early + log
    finally:
        stop(holder)
        if waiter is not None:
            stop(waiter)


@contextlib.contextmanager
def one_connection_role(dsn: str) -> Iterator[str]:
    """A role allowed one connection: its LISTEN connection is always refused."""
    role = f"bench_one_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with admin(dsn) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1 PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        for line in setup_sql("public", role).splitlines():
            if line.startswith("GRANT"):  # what `init --print-sql` grants
                conn.execute(line.encode())
    try:
        yield psycopg.conninfo.make_conninfo(dsn, user=role, password=password)
    finally:
        with admin(dsn) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def bench_handoff(dsn: str, rounds: int, fallback_rounds: int, out: Results) -> None:
    print(f"hand-off: {rounds} rounds with NOTIFY, {fallback_rounds} without")
    notified = []
    for i in range(rounds):
        latency_s, log = handoff_round(dsn, dsn, f"bench-handoff-{i}", "30s")
        if "was released; trying now" not in log:
            raise RuntimeError(f"the waiter was not woken by the release: {log}")
        notified.append(latency_s)
    polled = []
    fallback_lease_s = 4.0
    with one_connection_role(dsn) as limited:
        for i in range(fallback_rounds):
            latency_s, log = handoff_round(
                dsn, limited, f"bench-poll-{i}", f"{fallback_lease_s:g}s"
            )
            if "waiting without notifications" not in log:
                raise RuntimeError(f"the fallback waiter listened after all: {log}")
            polled.append(latency_s)
    ok = median_ms(notified) < 50
    out.add(
        f"hand-off: holder's child exits -> waiter's child starts (median of {rounds})",
        f"{median_ms(notified):.1f} ms (min {min(notified) * 1000:.1f}, "
        f"max {max(notified) * 1000:.1f})",
        f"without LISTEN: {median_ms(polled):.0f} ms (median of {fallback_rounds}, "
        f"lease {fallback_lease_s:g} s; scales with the lease)",
        "median < 50 ms",
        verdict(ok),
    )


def bench_failover(dsn: str, leases_s: list[float], out: Results) -> None:
    print(f"failover after kill -9: leases {leases_s}")
    ratios = []
    for n, lease_s in enumerate(leases_s):
        lock = f"bench-failover-{n}-{uuid.uuid4().hex[:6]}"
        holder = subprocess.Popen(
            [
                *lr(dsn, lock, "--lease-duration", f"{lease_s:g}s", "--"),
                "sh",
                "-c",
                "echo ready; exec sleep 1000",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        if readline(holder.stdout).strip() != "ready":
            holder.kill()
            raise RuntimeError("the holder did not start its child")
        waiter = subprocess.Popen(
            # The same lease as the holder's, as a fleet's nodes share settings:
            # the waiter's retry jitter (lease/30) follows its own lease.
            [
                *lr(dsn, lock, "--lease-duration", f"{lease_s:g}s", "--wait", "-vv"),
                "--",
                "date",
                "+%s%N",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiter.stderr is not None
            assert waiter.stdout is not None
            wait_for(waiter.stderr, "is held; retrying")
            # Kill at a random point of the renewal cycle.
            time.sleep(random.uniform(0.5, 0.5 + lease_s / 3))
            killed_ns = time.time_ns()
            holder.send_signal(signal.SIGKILL)
            started_ns = int(readline(waiter.stdout, lease_s * 3 + 30))
            ratios.append((started_ns - killed_ns) / 1e9 / lease_s)
        finally:
            stop(waiter)
            holder.kill()
            holder.communicate()
    worst = max(ratios)
    out.add(
        f"failover after `kill -9` of the holder, x lease ({len(ratios)} runs, "
        f"leases {', '.join(f'{s:g} s' for s in leases_s)})",
        ", ".join(f"{r:.3f}" for r in ratios),
        "lease end: 1.0",
        "<= 1.1",
        f"worst {worst:.3f}: {verdict(worst <= 1.1)}",
    )


def statement_calls(dsn: str) -> dict[str, int]:
    """pg_stat_statements calls on leader_lease and LISTEN, by kind."""
    kinds = {
        "acquire": 0,
        "renew": 0,
        "release": 0,
        "listen": 0,
        "connect check": 0,
        "other": 0,
    }
    with admin(dsn) as conn:
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements "
            "WHERE query LIKE '%%leader_lease%%' OR query LIKE 'LISTEN%%' "
            "OR query LIKE '%%current_setting(%%'"
        ).fetchall()
    for query, calls in rows:
        if "current_setting(" in query:
            # Each new lease connection reads synchronous_commit once.
            kinds["connect check"] += calls
        elif query.startswith("LISTEN"):
            kinds["listen"] += calls
        elif "INSERT INTO" in query and "ON CONFLICT" in query:
            kinds["acquire"] += calls
        elif "pg_notify" in query:
            kinds["release"] += calls
        elif query.lstrip().startswith("UPDATE") and "renewed_at = now()" in query:
            kinds["renew"] += calls
        else:
            kinds["other"] += calls
    return kinds


def reset_statements(dsn: str) -> None:
    with admin(dsn) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def bench_statements(dsn: str, out: Results) -> None:
    print("database cost: pg_stat_statements")
    try:
        with admin(dsn) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT count(*) FROM pg_stat_statements")
    except psycopg.Error as exc:
        out.notes.append(f"Statement counts not measured: {exc}".strip())
        return
    # One holder: acquire, renewals, release.
    reset_statements(dsn)
    done = subprocess.run(
        [
            *lr(
                dsn,
                f"bench-stmt-{uuid.uuid4().hex[:6]}",
                "--lease-duration",
                "4s",
                "-vv",
            ),
            "--",
            "sleep",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    renewals = done.stderr.count("renewed ")
    calls = statement_calls(dsn)
    out.add(
        "statements per acquire / renewal / release (one run, "
        f"{renewals} renewals logged)",
        f"{calls['acquire']} / {calls['renew'] / max(renewals, 1):.2f} / "
        f"{calls['release']}; plus {calls['connect check']} settings read per "
        f"connection; other {calls['other']}",
        "-",
        "1 each",
        verdict(
            calls["acquire"] == 1
            and calls["renew"] == renewals
            and calls["release"] == 1
            and calls["other"] == 0
        ),
    )
    # Idle waiters, and one hand-off among many waiters.
    lease_s, periods, waiters_n = 5.0, 4, 4
    lock = f"bench-idle-{uuid.uuid4().hex[:6]}"
    holder = subprocess.Popen(
        [
            *lr(dsn, lock, "--lease-duration", f"{lease_s:g}s", "--"),
            "sh",
            "-c",
            "echo ready; read x",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    waiters = []
    try:
        assert holder.stdout is not None
        assert holder.stdin is not None
        readline(holder.stdout)
        for _ in range(waiters_n):
            waiter = subprocess.Popen(
                lr(dsn, lock, "--wait", "-vv", "--", "sh", "-c", "sleep 0.2"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            waiters.append(waiter)
        for waiter in waiters:
            assert waiter.stderr is not None
            wait_for(waiter.stderr, "is held; retrying")
        reset_statements(dsn)
        time.sleep(lease_s * periods)
        idle = statement_calls(dsn)
        reset_statements(dsn)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
        time.sleep(0.1)  # the winner's child runs 0.2 s: catch the first hand-off only
        handoff = statement_calls(dsn)
    finally:
        for waiter in waiters:
            stop(waiter)
        stop(holder)
    per_waiter = idle["acquire"] / waiters_n / periods
    out.add(
        f"statements per idle waiter per lease period ({waiters_n} waiters, "
        f"{periods} periods of {lease_s:g} s)",
        f"{per_waiter:.2f} (LISTEN {idle['listen']}, other {idle['other']})",
        f"polling every 2 s (Kubernetes): {lease_s / 2:.1f}",
        "about 1",
        verdict(per_waiter <= 1.5),
    )
    out.add(
        f"acquire statements at one hand-off, {waiters_n} waiters",
        f"{handoff['acquire']} ({handoff['acquire'] / waiters_n:.2f} per waiter)",
        "-",
        "<= 1 per waiter",
        verdict(handoff["acquire"] <= waiters_n),
    )


def bench_scale(
    dsn: str,
    cluster: Any,
    procs: int,
    locks: int,
    seconds: float,
    job_s: float,
    baseline_rss_kb: float,
    out: Results,
) -> None:
    print(
        f"scale: {procs} processes, {locks} locks, {seconds:g} s, jobs of {job_s:g} s"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    prefix = f"bench-scale-{uuid.uuid4().hex[:6]}"
    job = (
        'echo start $LEADERRUN_FENCING_TOKEN $(date +%s%N) >> "$0"; '
        f"sleep {job_s:g}; "
        'echo stop $LEADERRUN_FENCING_TOKEN $(date +%s%N) >> "$0"'
    )
    finished: list[Finished] = []
    errors: list[str] = []
    live: dict[int, tuple[int, subprocess.Popen[bytes], Path, float]] = {}
    lock_guard = threading.Lock()
    connections: list[int] = []
    peaks: dict[int, int] = {}
    alive: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        with admin(dsn) as conn:
            while not sampling.wait(1.0):
                (count,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'leaderrun'"
                ).fetchone()
                connections.append(count)
                alive.append(len(live))
                for pid in list(live):
                    hwm = vm_hwm_kb(pid)
                    if hwm is not None:
                        peaks[pid] = max(peaks.get(pid, 0), hwm)

    def spawn(slot: int) -> None:
        lock = slot % locks
        err = work / f"err-{slot}-{time.monotonic_ns()}"
        err_file = err.open("w")
        proc = subprocess.Popen(
            [
                *lr(dsn, f"{prefix}-{lock}", "--wait", "--"),
                "sh",
                "-c",
                job,
                str(work / f"events-{lock}"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
        err_file.close()
        live[proc.pid] = (slot, proc, err, time.perf_counter())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_before = server_cpu_s(cluster)
    began = time.perf_counter()
    for slot in range(procs):
        spawn(slot)
    while live:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in live:
            continue
        slot, proc, err, started = live.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        done = Finished(
            code,
            time.perf_counter() - started,
            usage.ru_utime + usage.ru_stime,
        )
        with lock_guard:
            finished.append(done)
        text = err.read_text()
        if code != 0 or text:
            errors.append(f"status {code}: {text.strip()[:200]}")
        if time.perf_counter() - began < seconds:
            spawn(slot)
    wall_s = time.perf_counter() - began
    cpu_after = server_cpu_s(cluster)
    sampling.set()
    sampler.join()
    # No overlap, tokens increasing: per lock, in start order.
    overlaps = 0
    runs = 0
    for lock in range(locks):
        events = work / f"events-{lock}"
        if not events.exists():
            continue
        starts, stops = {}, {}
        for line in events.read_text().splitlines():
            what, token, stamp = line.split()
            (starts if what == "start" else stops)[int(token)] = int(stamp)
        runs += len(starts)
        ordered = sorted(starts, key=starts.get)
        if ordered != sorted(ordered):
            overlaps += 1
        for a, b in itertools.pairwise(ordered):
            if b not in stops or a not in stops or starts[b] < stops[a]:
                overlaps += 1
    shutil.rmtree(work, ignore_errors=True)
    rss = list(peaks.values())
    peak_rss = statistics.median(rss)
    out.add(
        f"scale: {procs} processes over {locks} locks, {wall_s:.0f} s, "
        f"{runs} jobs of {job_s:g} s",
        f"overlaps {overlaps}, errors {len(errors)}",
        "-",
        "zero overlap, zero errors",
        verdict(overlaps == 0 and not errors),
    )
    out.add(
        "scale: connections used (leaderrun's, sampled each second)",
        f"max {max(connections)}, median {statistics.median(connections):.0f}",
        f"leaderrun processes alive: median {statistics.median(alive):.0f}",
        "1 per holder, 2 per waiter",
        f"{max(connections) / procs:.2f} per process",
    )
    if cpu_before is not None and cpu_after is not None:
        server = cpu_after - cpu_before
        out.add(
            "scale: server CPU",
            f"{server:.1f} s over {wall_s:.0f} s = {server / wall_s:.2f} cores; "
            f"{server / max(runs, 1) * 1000:.1f} ms per job",
            "-",
            "-",
            "-",
        )
    out.add(
        f"scale: supervisor peak RSS (VmHWM, median of {len(rss)} processes)",
        f"{peak_rss / 1024:.1f} MiB (max {max(rss) / 1024:.1f})",
        f"minimal psycopg script {baseline_rss_kb / 1024:.1f} MiB",
        "<= 1.2 x",
        f"{peak_rss / baseline_rss_kb:.2f}: "
        f"{verdict(peak_rss <= 1.2 * baseline_rss_kb)}",
    )
    out.add(
        "scale: leaderrun CPU per run (median, user+sys)",
        f"{statistics.median(f.cpu_s for f in finished) * 1000:.0f} ms",
        "-",
        "-",
        "-",
    )
    if errors:
        out.notes.append("First errors: " + " | ".join(errors[:5]))


# --- the report --------------------------------------------------------------


def machine(dsn: str) -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    with admin(dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
    from importlib.metadata import version

    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- Python {platform.python_version()}, psycopg {version('psycopg')}, "
        f"typer {version('typer')}, leaderrun {__version__}",
        f"- PostgreSQL {server} on loopback",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--dsn", help="use this server instead of a throwaway cluster")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--runs", type=int, default=21, help="start-up runs (>= 20)")
    parser.add_argument("--handoffs", type=int, default=15)
    parser.add_argument("--fallback-handoffs", type=int, default=5)
    parser.add_argument("--scale-procs", type=int, default=200)
    parser.add_argument("--scale-locks", type=int, default=20)
    parser.add_argument("--scale-seconds", type=float, default=150.0)
    # Long enough that the 200 processes spend their time waiting, not starting:
    # each replacement costs a Python start-up, and the machine may have 2 cores.
    parser.add_argument("--scale-job", type=float, default=6.0, help="job length, s")
    parser.add_argument(
        "--failover-leases", type=float, nargs="+", default=[5.0, 5.0, 5.0, 30.0]
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["startup", "handoff", "failover", "statements", "scale"],
    )
    args = parser.parse_args()
    wanted = set(args.only or ["startup", "handoff", "failover", "statements", "scale"])
    # Bytecode as an installed package has it (pip compiles on install); with
    # PYTHONDONTWRITEBYTECODE set, an editable install would recompile each run.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "leaderrun")], check=True
    )
    out = Results()
    load_before = os.getloadavg()
    began = time.monotonic()
    # 200 leaderruns hold up to two connections each (lease + LISTEN).
    with postgres(args.dsn, max_connections=1000) as (dsn, cluster):
        PostgresLeaseStore(dsn).init()
        described = machine(dsn)
        rss = 0.0
        if "startup" in wanted or "scale" in wanted:
            rss = bench_startup(dsn, args.runs, out)
        if "handoff" in wanted:
            bench_handoff(dsn, args.handoffs, args.fallback_handoffs, out)
        if "failover" in wanted:
            bench_failover(dsn, args.failover_leases, out)
        if "statements" in wanted:
            bench_statements(dsn, out)
        if "scale" in wanted:
            bench_scale(
                dsn,
                cluster,
                args.scale_procs,
                args.scale_locks,
                args.scale_seconds,
                args.scale_job,
                rss,
                out,
            )
    load_after = os.getloadavg()
    lines = [
        "# leaderrun benchmark results",
        "",
        "Written by `python -m bench"
        + "".join(f" {arg}" for arg in sys.argv[1:])
        + "`; "
        f"took {time.monotonic() - began:.0f} s.",
        "",
        *described,
        f"- load average (1, 5, 15 min) before: {load_before[0]:.2f}, "
        f"{load_before[1]:.2f}, {load_before[2]:.2f}; after: {load_after[0]:.2f}, "
        f"{load_after[1]:.2f}, {load_after[2]:.2f} "
        "(other work on the machine shares its cores)",
        "",
        "| figure | leaderrun | baseline | goal | met |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in out.rows),
        "",
        *(f"- {note}" for note in out.notes),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
