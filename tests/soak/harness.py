"""The soak: contenders in a loop behind proxies, a nemesis, and what they left behind.

:class:`Soak` runs ``nodes`` leaderrun contenders on one lock, each through its
own :class:`~tests.faults.proxy.Proxy` to the real server, each in a loop of
short runs of ``tests/soak/job.py`` (skip and ``--wait`` mixed, some with
``--once-per`` or ``--min-hold``), while the nemesis (:mod:`tests.soak.nemesis`)
injects its schedule. The fault suite's :class:`~tests.faults.conftest.Timeline`
sees every job start and opens a pidfd on it; at the end, the history goes to
the checker (:mod:`tests.soak.history`) with the counters as the database holds
them.

Node ``n0`` always waits (``--wait``, no window), so that after the last heal
someone is there to take the lock: liveness is leaderrun's to show, not luck.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from leaderrun.lease import CLOCK_RATE_BOUND, make_timing
from tests.faults.conftest import LEASE_S, SABOTAGE, Timeline, boottime
from tests.faults.proxy import BLACKHOLE, HOLD, PASS, Proxy
from tests.faults.test_faults import server_pids
from tests.helpers.faketime import faketime_env, faketime_library
from tests.helpers.processes import stat_fields
from tests.pg import PgCluster
from tests.soak.history import (
    START_ALLOWANCE_S,
    Child,
    CounterCheck,
    FaultRecord,
    SoakResult,
)
from tests.soak.nemesis import KINDS, LOCAL_ONLY_KINDS, SERVER_KINDS, Fault, schedule

REPO = Path(__file__).resolve().parents[2]
SAFETY_DOC = REPO / "docs" / "safety.md"

TIMING = make_timing(LEASE_S)

LIVENESS_BOUND_S = (
    LEASE_S * (1 + CLOCK_RATE_BOUND) + TIMING.jitter_s + START_ALLOWANCE_S
)
"""After the last heal a child must run within one lease plus jitter (plus the
start of a Python job on a loaded host)."""

STOP_S = 30.0
"""The bound on every stop of the soak's own processes and commands."""

HOLDER_WAIT_S = LEASE_S / 2
"""How long a fault aimed at the holder waits for one, when nobody holds the lock."""

JOB_SECONDS = (0.1, 2.0)
SKIP_PAUSE_S = (1.0, 3.0)
"""After a node found the lock held: skip-mode nodes come back like a cron retry."""
RUN_PAUSE_S = (0.05, 0.3)


class StderrPipe:
    """leaderrun's stderr: a pipe whose reader copies it to the node's log, and
    which the nemesis can stall: the reader stops and a filler fills the pipe,
    so that leaderrun's next write would block, as under a stuck log shipper."""

    def __init__(self, log: BinaryIO) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._log = log
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._open = True
        threading.Thread(target=self._read, daemon=True).start()

    def stall(self) -> None:
        with self._lock:
            if not self._open or not self._flowing.is_set():
                return
            self._flowing.clear()
            fd = os.dup(self.write_fd)
        threading.Thread(target=self._fill, args=(fd,), daemon=True).start()

    def resume(self) -> None:
        self._flowing.set()

    def close_writer(self) -> None:
        """Our end, once leaderrun has exited: the reader then sees EOF."""
        with self._lock:
            self._open = False
            os.close(self.write_fd)

    def _fill(self, fd: int) -> None:
        try:
            while not self._flowing.is_set():
                os.write(fd, b"\0" * 4096)  # blocks once the pipe is full
        finally:
            os.close(fd)

    def _read(self) -> None:
        try:
            while True:
                self._flowing.wait()
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    return
                self._log.write(chunk.replace(b"\0", b""))
        finally:
            os.close(self.read_fd)


class Node:
    """One contender: its proxy, its loop of leaderrun runs, its faults' knobs."""

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.name = f"n{index}"
        self.steady = index == 0
        self.rng = random.Random(f"{soak.seed}:{self.name}")
        self.proxy = Proxy(soak.cluster.host, soak.cluster.port)
        self.dsn = (
            f"host={soak.cluster.host} port={self.proxy.port} dbname=postgres "
            "user=postgres"
        )
        self.log = open(soak.dir / f"{self.name}.log", "ab", buffering=0)  # noqa: SIM115
        self.current: subprocess.Popen[bytes] | None = None
        self.pipe: StderrPipe | None = None
        self.clock_offset: str | None = None
        self.stderr_stalled = False
        self.stalled_pipes: list[StderrPipe] = []
        self.knobs = threading.Lock()  # stderr_stalled and stalled_pipes
        self.network = threading.Lock()  # one network fault at a time
        self.exits: Counter[str] = Counter()
        self._thread = threading.Thread(target=soak.guarded(self._loop), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def draw(self) -> tuple[list[str], float]:
        """This run's options and its job's length, from the node's own seed."""
        rng = self.rng
        args = ["-v", "--lease-duration", f"{LEASE_S:g}s"]
        if self.steady or rng.random() < 0.5:
            args.append("--wait")
        if not self.steady and rng.random() < 0.15:
            args += ["--once-per", "5s"]
        if rng.random() < 0.2:
            args += ["--min-hold", f"{rng.uniform(0.5, 2.0):.2f}s"]
        return args, rng.uniform(*JOB_SECONDS)

    def _argv(self, args: list[str], job_s: float) -> list[str]:
        soak = self.soak
        launcher = [sys.executable, "-m", "leaderrun"]
        if soak.sabotage is not None:
            launcher = [sys.executable, SABOTAGE, soak.sabotage]
        return [
            *launcher,
            "--dsn",
            self.dsn,
            "--lock-id",
            soak.lock,
            *args,
            "--",
            sys.executable,
            "-m",
            "tests.soak.job",
            str(soak.timeline.path),
            str(soak.job_log),
            self.name,
            self.dsn,
            soak.schema,
            soak.lock,
            f"{job_s:.3f}",
            str(soak.seed),
        ]

    def _loop(self) -> None:
        while not self.soak.stopping.is_set():
            args, job_s = self.draw()
            env = dict(os.environ)
            if self.clock_offset is not None:
                env.update(faketime_env(self.clock_offset))
            pipe = StderrPipe(self.log)
            with self.knobs:
                if self.stderr_stalled:
                    pipe.stall()
                    self.stalled_pipes.append(pipe)
            self.log.write(f"--- {' '.join(args)} (job {job_s:.2f}s)\n".encode())
            proc = subprocess.Popen(
                self._argv(args, job_s),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=pipe.write_fd,
                env=env,
                cwd=REPO,
            )
            self.current, self.pipe = proc, pipe
            code = proc.wait()
            pipe.close_writer()
            self.exits[str(code)] += 1
            pause = SKIP_PAUSE_S if code == 75 else RUN_PAUSE_S
            self.soak.stopping.wait(self.rng.uniform(*pause))

    def stall_stderr(self, stalled: bool) -> None:
        """Stall the current run's stderr and every next one's, or resume them all."""
        with self.knobs:
            self.stderr_stalled = stalled
            if stalled:
                if self.pipe is not None:
                    self.pipe.stall()
                    self.stalled_pipes.append(self.pipe)
                return
            for pipe in self.stalled_pipes:
                pipe.resume()
            self.stalled_pipes.clear()

    def signal(self, signum: int) -> int | None:
        """Send ``signum`` to the node's current leaderrun; its pid, if one runs."""
        proc = self.current
        if proc is None or proc.poll() is not None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        return proc.pid

    def stop(self) -> None:
        """SIGTERM the current run (leaderrun forwards it), SIGKILL if it lingers."""
        proc = self.current
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parent_of(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def last_cpu(pid: int) -> int | None:
    """The CPU ``pid`` last ran on (field 39 of /proc/PID/stat)."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[36])


class Soak:
    """One soak: a lock, its contenders, the nemesis, and the history they make."""

    def __init__(
        self,
        cluster: PgCluster,
        directory: Path,
        *,
        seed: int,
        seconds: float,
        nodes: int = 4,
        kinds: tuple[str, ...] = KINDS,
        sabotage: str | None = None,
        replay: str,
    ) -> None:
        self.cluster = cluster
        self.dir = directory
        self.seed = seed
        self.seconds = seconds
        self.sabotage = sabotage
        self.replay = replay
        self.lock = f"soak-{seed}-{uuid.uuid4().hex[:8]}"
        self.schema = f"soak_{uuid.uuid4().hex[:12]}"
        self.job_log = directory / "jobs"
        self.job_log.touch()
        usable = [k for k in kinds if cluster.local or k not in LOCAL_ONLY_KINDS]
        if faketime_library() is None:
            usable = [k for k in usable if k != "clock"]
        self.kinds = tuple(usable)
        self.faults = schedule(seed, seconds, nodes, LEASE_S, self.kinds)
        self.records: list[FaultRecord] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.server = threading.Lock()
        self.timeline = Timeline(directory / "events")
        self.nodes = [Node(self, i) for i in range(nodes)]

    # --- the database side -------------------------------------------------------

    def guarded(self, work: Callable[..., None]) -> Callable[..., None]:
        """``work`` for a thread: an exception is kept for the verdict, not lost."""

        def run(*args: object) -> None:
            try:
                work(*args)
            except Exception:
                self.errors.append(traceback.format_exc())

        return run

    def _admin(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(
            self.cluster.dsn,
            autocommit=True,
            connect_timeout=5,
            application_name="leaderrun-soak",
        )

    def _create_tables(self) -> None:
        """The counters, and the fencing recipe of docs/safety.md, verbatim."""
        recipe = fence_recipe()
        with self._admin() as conn:
            schema = sql.Identifier(self.schema)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            self._use_schema(conn)
            conn.execute(recipe.encode())
            conn.execute(
                "CREATE TABLE soak_counter "
                "(kind text PRIMARY KEY, value bigint NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE soak_increment (kind text NOT NULL, token bigint NOT "
                "NULL, pid integer NOT NULL)"
            )
            conn.execute(
                "INSERT INTO soak_counter VALUES ('unfenced', 0), ('fenced', 0)"
            )

    def _counters(self) -> list[CounterCheck]:
        refused = Counter(line.split()[0] for line in self._job_lines())["stale"]
        with self._admin() as conn:
            self._use_schema(conn)
            rows = conn.execute(
                "SELECT c.kind, c.value, (SELECT count(*) FROM soak_increment i "
                "WHERE i.kind = c.kind) FROM soak_counter c ORDER BY c.kind"
            ).fetchall()
        return [
            CounterCheck(
                kind, int(value), int(committed), refused if kind == "fenced" else 0
            )
            for kind, value, committed in rows
        ]

    def _use_schema(self, conn: psycopg.Connection[TupleRow]) -> None:
        conn.execute(
            sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))
        )

    def _drop_tables(self) -> None:
        with contextlib.suppress(psycopg.Error), self._admin() as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(self.schema))
            )

    def _job_lines(self) -> list[str]:
        return self.job_log.read_text().splitlines()

    # --- the nemesis ---------------------------------------------------------------

    def holder(self) -> Node | None:
        """The node whose leaderrun is the parent of a running child, if any."""
        running = [p for p in self.timeline.snapshot() if p.end_s == float("inf")]
        for proc in running:
            parent = parent_of(proc.pid)
            for node in self.nodes:
                if node.current is not None and node.current.pid == parent:
                    return node
        return None

    def _target(self, fault: Fault, rng: random.Random) -> Node:
        if fault.target != "holder":
            return self.nodes[int(fault.target[1:])]
        # Between two runs nobody holds the lock for a moment: wait for the next
        # child rather than spend the fault on a bystander, within a bound.
        deadline_s = boottime() + HOLDER_WAIT_S
        while (node := self.holder()) is None and boottime() < deadline_s:
            time.sleep(0.05)
        return node if node is not None else rng.choice(self.nodes)

    def _nemesis(self, start_s: float) -> None:
        threads = []
        for index, fault in enumerate(self.faults):
            if self.stopping.wait(max(0.0, start_s + fault.at_s - boottime())):
                break
            thread = threading.Thread(
                target=self.guarded(self._carry_out), args=(fault, index), daemon=True
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(STOP_S * 4)

    def _carry_out(self, fault: Fault, index: int) -> None:
        rng = random.Random(f"{self.seed}:fault:{index}")
        server = self.server if fault.kind in SERVER_KINDS else contextlib.nullcontext()
        with server:
            target = "server"
            if fault.target == "lock":
                target = "lock"
            node = None
            if fault.target not in ("server", "lock"):
                node = self._target(fault, rng)
                target = node.name
            injected_s = boottime()
            state = self._inject(fault, node)
            if fault.duration_s:
                time.sleep(max(0.0, injected_s + fault.duration_s - boottime()))
            detail = self._heal(fault, node, state)
            if detail is None:
                detail = state if isinstance(state, str) else ""
        record = FaultRecord(fault.kind, target, injected_s, boottime(), detail)
        self.records.append(record)

    def _inject(self, fault: Fault, node: Node | None) -> object:
        kind = fault.kind
        if kind == "restart":
            self.cluster.stop(fault.param)
            return fault.param
        if kind == "freeze":
            return self._stop_all(server_pids(self.cluster))
        if kind == "release-force":
            done = subprocess.run(
                [
                    *(sys.executable, "-m", "leaderrun", "release", "--force"),
                    *("--dsn", self.cluster.dsn, "--lock-id", self.lock),
                ],
                capture_output=True,
                timeout=STOP_S,
                check=False,
            )
            return f"exit {done.returncode}"
        assert node is not None
        if kind == "kill9":
            return f"pid {node.signal(signal.SIGKILL)}"
        if kind == "stop":
            return node.signal(signal.SIGSTOP)
        if kind in ("partition", "delay", "reset"):
            if not node.network.acquire(blocking=False):
                return "skipped: the node's network is already faulty"
            if kind == "reset":
                node.network.release()
                return f"{node.proxy.reset()} connections reset"
            node.proxy.set_mode(BLACKHOLE if kind == "partition" else HOLD)
            return "on"
        if kind == "stop-backend":
            return self._stop_all(self._backends(node))
        if kind == "clock":
            node.clock_offset = fault.param
            return fault.param
        if kind == "stderr-stall":
            node.stall_stderr(True)
            return "stalled"
        if kind == "cpu-hog":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            holder = node.current
            cpu = None if holder is None else last_cpu(holder.pid)
            if cpu is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(hog.pid, {cpu})
            return hog
        raise AssertionError(f"unknown fault kind {kind!r}")

    def _heal(self, fault: Fault, node: Node | None, state: object) -> str | None:
        kind = fault.kind
        if kind == "restart":
            self.cluster.start()
        elif kind in ("freeze", "stop-backend"):
            assert isinstance(state, list)
            for fd in state:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGCONT)
                os.close(fd)
            return f"{len(state)} processes"
        elif node is None:
            return None
        elif kind == "stop" and isinstance(state, int):
            node.signal(signal.SIGCONT)
            return f"pid {state}"
        elif kind in ("partition", "delay") and state == "on":
            node.proxy.set_mode(PASS)
            node.proxy.drop_dead()
            node.network.release()
            return None
        elif kind == "clock":
            node.clock_offset = None
        elif kind == "stderr-stall":
            node.stall_stderr(False)
        elif kind == "cpu-hog" and isinstance(state, subprocess.Popen):
            state.kill()
            state.wait()
            return "hog"
        return None

    def _stop_all(self, pids: list[int]) -> list[int]:
        """SIGSTOP each pid; its pidfd, so that SIGCONT never hits a reused pid."""
        fds = []
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGSTOP)
            fds.append(fd)
        return fds

    def _backends(self, node: Node) -> list[int]:
        """The server processes serving ``node``'s connections (leaderrun's, job's)."""
        ports = node.proxy.upstream_ports()
        try:
            with self._admin() as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                    (ports,),
                ).fetchall()
        except psycopg.Error:
            return []
        return [int(row[0]) for row in rows]

    # --- the run ---------------------------------------------------------------------

    def run(self) -> SoakResult:
        """Run the schedule, heal everything, let the lock settle, and collect."""
        began = time.monotonic()
        self._create_tables()
        start_s = boottime()
        try:
            for node in self.nodes:
                node.start()
            nemesis = threading.Thread(
                target=self.guarded(self._nemesis), args=(start_s,)
            )
            nemesis.start()
            nemesis.join()
            self._settle(start_s)
        finally:
            self._shut_down()
        result = SoakResult(
            seed=self.seed,
            nodes=len(self.nodes),
            seconds=self.seconds,
            lease_s=LEASE_S,
            liveness_bound_s=LIVENESS_BOUND_S,
            replay=self.replay,
            sabotage=self.sabotage,
            faults=sorted(self.records, key=lambda r: r.injected_s),
            start_s=start_s,
            machine=machine(),
            errors=self.errors,
        )
        result.children = self._children()
        result.exits = dict(sum((node.exits for node in self.nodes), Counter()))
        result.counters = self._counters()
        self._drop_tables()
        result.wall_s = time.monotonic() - began
        return result

    def _settle(self, start_s: float) -> None:
        """After the nemesis: wait out the liveness bound from the last heal (and
        the schedule's end), so the last takeover is seen."""
        last_heal_s = max((r.healed_s for r in self.records), default=start_s)
        end_s = max(last_heal_s, start_s + self.seconds) + LIVENESS_BOUND_S + 1.0
        time.sleep(max(0.0, end_s - boottime()))

    def _shut_down(self) -> None:
        self.stopping.set()
        for node in self.nodes:
            node.stop()
            node.join(STOP_S)
            node.stall_stderr(False)
        # Every run has ended; whatever a run left (it should leave nothing).
        # Only processes the timeline still sees alive: an ended one's pid may
        # belong to someone else by now.
        for proc in self.timeline.snapshot():
            if proc.end_s == float("inf"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for node in self.nodes:
            node.proxy.close()
        deadline = time.monotonic() + STOP_S
        while time.monotonic() < deadline and any(
            p.end_s == float("inf") for p in self.timeline.snapshot()
        ):
            time.sleep(0.05)
        self.timeline.close()
        for node in self.nodes:
            node.log.close()

    def _children(self) -> list[Child]:
        ended = set()
        node_of = {}
        for line in self._job_lines():
            what, node, token, pid, _ = line.split()
            node_of[(int(token), int(pid))] = node
            if what == "end":
                ended.add((int(token), int(pid)))
        return [
            Child(
                p.token,
                p.pid,
                node_of.get((p.token, p.pid), "?"),
                p.start_s,
                p.end_s,
                (p.token, p.pid) in ended,
            )
            for p in self.timeline.snapshot()
        ]


def fence_recipe() -> str:
    """The fencing SQL of docs/safety.md (the block that defines ``fence``)."""
    blocks = re.findall(r"```sql\n(.*?)```", SAFETY_DOC.read_text(), re.DOTALL)
    recipe: str = next(b for b in blocks if "CREATE FUNCTION fence" in b)
    return recipe


def machine() -> str:
    """One line: CPUs, kernel, Python, for the report."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({model or 'unknown'}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def replay_command(
    seed: int,
    seconds: float,
    nodes: int,
    kinds: tuple[str, ...],
    sabotage: str | None,
) -> str:
    """The command that runs the same schedule again."""
    command = f"python -m tests.soak --seed {seed} --seconds {seconds:g}"
    command += f" --nodes {nodes}"
    if kinds != KINDS:
        command += f" --kinds {','.join(kinds)}"
    if sabotage is not None:
        command += f" --sabotage {sabotage}"
    return command
