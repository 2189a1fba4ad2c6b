"""The scale run's check of its jobs: the fault suite's overlap property, per lock."""

from bench.scale import Fleet, job_spans
from tests.helpers.intervals import NOT_ENDED


def events(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


def test_job_spans_pair_each_token_start_with_its_stop():
    """A job without a stop line runs on forever, as far as the check knows."""
    text = events("start 1 100", "stop 1 200", "start 2 250")
    assert job_spans(text) == {1: (100, 200), 2: (250, NOT_ENDED)}


def test_jobs_are_counted_and_overlaps_found_per_lock(tmp_path):
    """Overlapping jobs and tokens out of start order count; locks are apart."""
    fleet = Fleet("dbname=unused", tmp_path, procs=0, locks=3, job_s=1)
    fleet.events(0).write_text(
        events("start 1 100", "stop 1 200", "start 2 150", "stop 2 300")
    )
    fleet.events(1).write_text(
        events("start 5 100", "stop 5 200", "start 4 300", "stop 4 400")
    )
    # Lock 2's jobs overlap lock 0's in time, which is no overlap: other lock.
    fleet.events(2).write_text(events("start 1 120", "stop 1 130"))
    assert fleet.check_jobs() == (5, 2)


def test_jobs_one_after_another_are_no_overlap(tmp_path):
    """A lock whose jobs ran in turn, tokens increasing, counts none."""
    fleet = Fleet("dbname=unused", tmp_path, procs=0, locks=2, job_s=1)
    fleet.events(0).write_text(
        events("start 1 100", "stop 1 200", "start 2 200", "stop 2 300")
    )
    assert fleet.check_jobs() == (2, 0)
