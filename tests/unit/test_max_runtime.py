"""The supervisor's --max-runtime deadline, with a real child and a fake lease."""

from __future__ import annotations

import signal
import sys

from leaderrun.clock import boottime
from leaderrun.supervisor import Outcome, SignalInbox, Supervisor
from tests.unit.test_supervisor import Setup, handshake_child, setups

__all__ = ["setups"]  # the fixture, shared with test_supervisor


def supervise(setup: Setup, max_runtime_s: float) -> tuple[Outcome, float]:
    with SignalInbox() as inbox:
        started_s = boottime()
        supervisor = Supervisor(
            setup.child,
            inbox,
            setup.watch,
            setup.grace_s,
            boottime,
            runtime_deadline_s=started_s + max_runtime_s,
        )
        outcome = supervisor.run()
        return outcome, boottime() - started_s


def test_max_runtime_stops_the_command_and_says_so(setups):
    """At the runtime deadline: freeze, SIGTERM to the group, timed_out."""
    setup = setups(*handshake_child())
    (pid,) = setup.lines.ready_pids(1)
    outcome, took_s = supervise(setup, 0.3)
    assert outcome == Outcome(-signal.SIGTERM, timed_out=True)
    assert setup.lines.rest() == [f"SIGTERM {pid}"]
    assert setup.sent() == ["freeze", "group SIGTERM"]
    assert took_s >= 0.3


def test_a_command_that_ends_in_time_is_untouched(setups):
    setup = setups(sys.executable, "-c", "raise SystemExit(3)")
    outcome, _ = supervise(setup, 60)
    assert outcome == Outcome(3)
    assert setup.events == []
