"""Local fault: the host's wall clock steps while processes share a SQLite lease.

timesyncd steps the clock at 0.4 s of error, chrony's ``makestep`` and a VM
resume step it further, and ``date -s`` steps it anywhere. On one host every
contender shares that clock, so a lease decided by it moves with every step. Here
real ``leaderrun`` processes share one SQLite file; libfaketime shifts one
process's wall clock (``CLOCK_REALTIME`` only: ``CLOCK_BOOTTIME`` stays real, as a
step leaves it). Contenders 120 s off either way must not take the live lease,
and a holder whose clock steps mid-run must keep renewing and keep its child.
The property, as in ``tests/faults``: no two children's running intervals overlap.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leaderrun.errors import EXIT_BUSY
from tests.faults.conftest import JOB, LEASE_S, Proc, Timeline, boottime, record_figure
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(180)]

RENEW_EVERY_S = LEASE_S / 6
"""The default renewal interval for the suite's lease (0.67 s)."""

RENEWALS_FOR_TWO_LEASES = round(2 * LEASE_S / RENEW_EVERY_S)
"""Renewals that span two leases: a holder still running after them kept the lock."""

REPO = Path(__file__).parent.parent.parent.parent


class SqliteNode:
    """One ``leaderrun`` process on the scenario's SQLite file, running the job."""

    def __init__(
        self,
        scenario: SqliteScenario,
        name: str,
        args: tuple[str, ...],
        env: dict[str, str],
    ) -> None:
        self.name = name
        self.stderr_path = scenario.dir / f"{name}.stderr"
        argv = [
            sys.executable,
            "-m",
            "leaderrun",
            "--dsn",
            scenario.dsn,
            "--lock-id",
            scenario.lock,
            "--lease-duration",
            f"{LEASE_S:g}s",
            "-vv",
            *args,
            "--",
            sys.executable,
            JOB,
            str(scenario.timeline.path),
        ]
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **env},
                cwd=REPO,
            )

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text()

    def renewals(self) -> int:
        """How many renewals the process has logged (it runs with ``-vv``)."""
        return self.stderr().count("renewed ")

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class SqliteScenario:
    """The nodes, the timeline, the lock and the file of one scenario."""

    def __init__(self, directory: Path, lock: str) -> None:
        self.dir = directory
        self.lock = lock
        self.dsn = f"sqlite://{directory}/leases.db"
        self.timeline = Timeline(directory / "events")
        self.nodes: list[SqliteNode] = []

    def node(
        self,
        name: str,
        *,
        args: tuple[str, ...] = ("--wait",),
        env: dict[str, str] | None = None,
    ) -> SqliteNode:
        """Start a contender (waiting, by default) on the file."""
        node = SqliteNode(self, name, args, env or {})
        self.nodes.append(node)
        return node

    def holder(self, env: dict[str, str] | None = None) -> tuple[SqliteNode, Proc]:
        """Start a node and wait until its child runs; return both."""
        node = self.node("holder", env=env)
        return node, self.timeline.wait_start(0)

    def cleanup(self) -> None:
        """Kill every node and whatever their jobs left running."""
        for node in self.nodes:
            node.kill()
        for proc in self.timeline.snapshot():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)
        self.timeline.close()


@pytest.fixture
def scenario(tmp_path: Path, lock_name: str) -> Iterator[SqliteScenario]:
    """A scenario on a fresh SQLite file, cleaned up whatever happens."""
    made = SqliteScenario(tmp_path, lock_name)
    try:
        yield made
    finally:
        made.cleanup()


def stepping_clock(
    faketime: Callable[[str], dict[str, str]], clock_file: Path
) -> tuple[dict[str, str], Callable[[str], None]]:
    """An environment whose wall clock follows ``clock_file``, and how to step it.

    libfaketime re-reads the file on every clock read (``FAKETIME_NO_CACHE``), so
    a rewrite is a step, as ``date -s`` makes one. The file is replaced whole
    (rename), so a read never sees it half written.
    """
    env = dict(faketime("+0s"))
    del env["FAKETIME"]  # the variable would win over the file
    env |= {"FAKETIME_TIMESTAMP_FILE": str(clock_file), "FAKETIME_NO_CACHE": "1"}

    def step_to(offset: str) -> None:
        scratch = clock_file.with_suffix(".new")
        scratch.write_text(f"{offset}\n")
        scratch.rename(clock_file)

    step_to("+0s")
    return env, step_to


@pytest.mark.parametrize("offset", ["+120s", "-120s"])
def test_contender_with_a_stepped_wall_clock_never_takes_a_live_lease(
    scenario, faketime, offset
):
    """A contender whose wall clock is 120 s off, either way, finds the live
    lease held: it exits 75, and its job never starts."""
    holder, first = scenario.holder()
    wait_until(lambda: holder.renewals() >= 1, "a first renewal of the holder")
    contender = scenario.node("contender", args=(), env=faketime(offset))
    wait_until(
        lambda: (
            contender.proc.poll() is not None or len(scenario.timeline.tokens()) > 1
        ),
        "the contender exits or starts its job",
    )
    scenario.timeline.check()
    assert scenario.timeline.tokens() == [first.token], "the contender's job started"
    assert contender.proc.wait() == EXIT_BUSY, contender.stderr()
    assert "is held by" in contender.stderr()
    assert scenario.timeline.running(first.token), "the holder lost its child"
    record_figure(
        f"L8 SQLite: contender's wall clock {offset}",
        "refused (75), job not started",
        None,
    )


@pytest.mark.parametrize("step", ["+120s", "-120s"])
def test_holder_whose_wall_clock_steps_keeps_renewing_and_its_child(
    scenario, faketime, tmp_path, step
):
    """The holder's wall clock steps 120 s mid-run, either way: it renews on
    for two leases and keeps its child, and a waiting contender on the true clock
    never starts its job."""
    env, step_to = stepping_clock(faketime, tmp_path / "holder-clock")
    holder, first = scenario.holder(env=env)
    contender = scenario.node("contender")
    wait_until(lambda: "is held; retrying" in contender.stderr(), "contender waits")
    before = holder.renewals()
    step_to(step)
    wait_until(
        lambda: (
            holder.renewals() >= before + RENEWALS_FOR_TWO_LEASES
            or len(scenario.timeline.tokens()) > 1
            or holder.proc.poll() is not None
        ),
        "two leases of renewals, a takeover, or the holder's exit",
    )
    scenario.timeline.check()
    assert scenario.timeline.tokens() == [first.token], "the contender's job started"
    assert holder.proc.poll() is None, f"the holder exited:\n{holder.stderr()}"
    assert scenario.timeline.running(first.token), "the holder lost its child"
    record_figure(
        f"L8 SQLite: holder's wall clock steps {step}", "renews on, child kept", None
    )


@pytest.mark.parametrize("offset", ["+120s", "-120s"])
def test_holder_killed_with_a_skewed_wall_clock_hands_over_after_one_lease(
    scenario, faketime, offset
):
    """A holder whose wall clock is 120 s off is killed with SIGKILL: the waiting
    contender takes over when the lease it last wrote ends on the boot clock,
    neither 120 s early nor 120 s late."""
    holder, first = scenario.holder(env=faketime(offset))
    contender = scenario.node("contender")
    wait_until(
        lambda: (
            "is held; retrying" in contender.stderr()
            or len(scenario.timeline.tokens()) > 1
        ),
        "the contender waits or starts its job",
    )
    scenario.timeline.check()
    assert scenario.timeline.tokens() == [first.token], "the contender's job started"
    wait_until(lambda: holder.renewals() >= 1, "a renewal of the skewed holder")
    fault_s = boottime()
    holder.proc.kill()
    nxt = scenario.timeline.wait_start(first.token)
    scenario.timeline.check()
    assert nxt.token == first.token + 1
    failover_s = nxt.start_s - fault_s
    assert failover_s <= LEASE_S + 2.0, f"took over {failover_s:.1f}s after the kill"
    record_figure(
        f"L8 SQLite: holder's wall clock {offset}, kill -9",
        "one new holder after the lease",
        failover_s,
    )
