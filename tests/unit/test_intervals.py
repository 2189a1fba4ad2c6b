"""The one overlap check shared by the fault suite's timeline and the bench."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tests.faults.conftest import Proc, Timeline
from tests.helpers.intervals import NOT_ENDED, Overlap, find_overlaps


def test_intervals_one_after_another_do_not_overlap():
    """Each interval starting when or after the previous one ended is no overlap."""
    assert find_overlaps({1: (0.0, 1.0), 2: (1.0, 2.0), 3: (5.0, 6.0)}) == []
    assert find_overlaps({}) == []
    assert find_overlaps({1: (0.0, NOT_ENDED)}) == []


def test_an_interval_ending_after_the_next_start_overlaps_it():
    """The pair comes earlier first, with the earlier's end and the later's start."""
    spans = {2: (1.5, 3.0), 1: (0.0, 2.0), 3: (3.0, 4.0)}
    assert find_overlaps(spans) == [Overlap(1, 2, 2.0, 1.5)]


def test_an_interval_that_never_ended_overlaps_the_next():
    """An end of NOT_ENDED (still running, or never seen to end) overlaps the next."""
    spans = {1: (0.0, NOT_ENDED), 2: (100.0, 101.0), 3: (200.0, NOT_ENDED)}
    assert find_overlaps(spans) == [Overlap(1, 2, NOT_ENDED, 100.0)]


def test_only_neighbours_in_start_order_are_reported():
    """A long interval is reported with its next neighbour only, not every later one."""
    spans = {1: (0.0, 10.0), 2: (1.0, 2.0), 3: (5.0, 6.0)}
    assert find_overlaps(spans) == [Overlap(1, 2, 10.0, 1.0)]


def test_nanosecond_stamps_are_compared_exactly():
    """Integer stamps one nanosecond apart (beyond a float's precision) still count."""
    stamp = 1_795_000_000_123_456_789
    assert find_overlaps({1: (stamp - 10, stamp + 1), 2: (stamp, stamp + 5)})
    assert not find_overlaps({1: (stamp - 10, stamp), 2: (stamp, stamp + 5)})


# Intervals of positive length: an empty one overlaps nothing, yet its start
# may fall inside its neighbour's.
spans_strategy = st.dictionaries(
    st.integers(1, 50),
    st.tuples(st.integers(0, 100), st.integers(1, 20)).map(
        lambda start_length: (start_length[0], start_length[0] + start_length[1])
    ),
)


@given(spans_strategy)
def test_none_reported_exactly_when_no_two_intervals_overlap(spans):
    """Comparing neighbours finds an overlap whenever any two intervals overlap."""
    any_pair = any(
        a_start < b_end and b_start < a_end
        for (a_start, a_end), (b_start, b_end) in itertools.combinations(
            spans.values(), 2
        )
    )
    assert bool(find_overlaps(spans)) == any_pair


def test_the_fault_timeline_describes_each_overlap(tmp_path):
    """Timeline.overlaps says how long the earlier token ran on, or that it runs."""
    timeline = Timeline(tmp_path / "events")
    try:
        timeline.procs.extend(
            [
                Proc(token=1, pid=10, start_s=0.0, end_s=1.0),
                Proc(token=2, pid=11, start_s=2.0, end_s=3.5),
                Proc(token=2, pid=12, start_s=2.5, end_s=3.0),
                Proc(token=3, pid=13, start_s=3.25),
                Proc(token=4, pid=14, start_s=9.0),
            ]
        )
        assert timeline.overlaps() == [
            "token 2 ran 0.25s after token 3 started",
            "token 3 is still running after token 4 started",
        ]
    finally:
        timeline.close()
