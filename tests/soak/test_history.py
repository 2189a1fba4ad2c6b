"""The soak's checker on histories written by hand: what it must and must not flag."""

from __future__ import annotations

import pytest

from tests.helpers.intervals import NOT_ENDED
from tests.soak.history import (
    Child,
    CounterCheck,
    FaultRecord,
    SoakResult,
    failovers_s,
    failure_message,
    percentile,
    render,
    retaken_after_s,
    violations,
)


def result(*children: Child, faults=(), counters=(), errors=()) -> SoakResult:
    made = SoakResult(
        seed=42,
        nodes=3,
        seconds=10.0,
        lease_s=4.0,
        liveness_bound_s=5.0,
        replay="python -m tests.soak --seed 42 --seconds 10 --nodes 3",
        children=list(children),
        faults=list(faults),
        counters=list(counters),
        errors=list(errors),
    )
    return made


def test_a_clean_history_passes():
    """Hand-offs that touch, tokens that grow, a lock retaken: nothing to say."""
    clean = result(
        Child(1, 100, "n0", 0.0, 2.0, finished=True),
        Child(2, 101, "n1", 2.0, 5.0),
        Child(4, 102, "n0", 9.5, NOT_ENDED),
        faults=[FaultRecord("partition", "n1", 4.0, 6.0)],
        counters=[CounterCheck("fenced", 10, 10), CounterCheck("unfenced", 9, 10)],
    )
    assert violations(clean) == []
    assert "verdict: PASS" in render(clean)
    assert "lost updates, unfenced | 1 of 10" in render(clean)


def test_an_overlap_is_caught_by_death_time_even_if_the_child_said_it_ended():
    """The interval ends at the pidfd's death time; a child still alive (never
    seen to end) overlaps every later one."""
    found = violations(
        result(
            Child(1, 100, "n0", 0.0, 3.5, finished=True),
            Child(2, 101, "n1", 3.0, 6.0),
            Child(3, 102, "n2", 7.0, NOT_ENDED),
            Child(4, 103, "n0", 8.0, NOT_ENDED),
        )
    )
    assert found[0].startswith("overlap: token 1 (pid 100, n0) ended 0.500s after")
    assert "token 3 (pid 102, n2) was never seen to end" in found[1]


@pytest.mark.parametrize(
    ("tokens", "word"), [((5, 5), "reused"), ((6, 5), "went backwards")]
)
def test_tokens_must_strictly_increase_in_start_order(tokens, word):
    """A token seen again, or a smaller one after a larger: the fence is broken."""
    first, second = tokens
    found = violations(
        result(
            Child(first, 100, "n0", 0.0, 1.0, finished=True),
            Child(second, 101, "n1", 2.0, NOT_ENDED),
        )
    )
    assert found == [
        f"token {second} (pid 101, n1) started after token {first} (pid 100, n0): "
        f"{word}"
    ]


def test_liveness_is_measured_from_the_last_heal():
    """Retaken within the bound passes; later, or never, fails."""
    late = result(
        Child(1, 100, "n0", 0.0, 1.0, finished=True),
        Child(2, 101, "n1", 12.0, NOT_ENDED),
        faults=[FaultRecord("restart", "server", 2.0, 6.0)],
    )
    assert violations(late) == [
        "liveness: after the last heal a child ran after 6.00s, bound 5.00s"
    ]
    never = result(
        Child(1, 100, "n0", 0.0, 1.0, finished=True),
        faults=[FaultRecord("freeze", "server", 2.0, 6.0)],
    )
    assert "ran never" in violations(never)[0]
    assert retaken_after_s(never.children, 0.5) == 0.0


def test_a_fenced_lost_update_fails_and_an_unfenced_one_is_only_reported():
    """Fenced losses break the property; unfenced ones are the point of fencing."""
    found = violations(
        result(
            Child(1, 100, "n0", 0.0, NOT_ENDED),
            counters=[CounterCheck("fenced", 8, 10), CounterCheck("unfenced", 3, 10)],
        )
    )
    assert found == ["fenced counter: 10 increments committed, value 8: 2 lost"]


def test_a_harness_error_fails_the_soak_with_its_seed_and_replay():
    """A soak that could not do its work does not pass quietly."""
    failed = result(Child(1, 100, "n0", 0.0, NOT_ENDED), errors=["Boom\n"])
    found = violations(failed)
    assert found == ["harness error: Boom"]
    message = failure_message(failed, found)
    assert message.startswith("soak seed 42 (3 nodes, 10s) broke 1 property:")
    assert message.endswith(
        "replay: python -m tests.soak --seed 42 --seconds 10 --nodes 3"
    )


def test_failover_runs_from_the_fault_that_stopped_the_child():
    """Only children that did not finish; only faults on their node, the server
    or the lock, in the last lease of their life (an earlier one was ridden out)."""
    children = [
        Child(1, 100, "n0", 0.0, 9.0),
        Child(2, 101, "n1", 11.0, 12.0, finished=True),
        Child(3, 102, "n2", 13.0, 13.5),
        Child(4, 103, "n0", 14.0, NOT_ENDED),
    ]
    faults = [
        FaultRecord("reset", "n0", 1.0, 1.0),  # ridden out: long before the end
        FaultRecord("partition", "n1", 6.0, 7.0),  # another node's
        FaultRecord("partition", "n0", 7.0, 9.0),
        FaultRecord("release-force", "lock", 8.0, 8.0),
    ]
    assert failovers_s(children, faults, lease_s=4.0) == [4.0]


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.5) == 50.0
    assert percentile([3.0], 0.95) == 3.0
