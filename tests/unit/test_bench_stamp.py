"""The bench's stamper (bench/stamp.c): built with the machine's C compiler.

The bench compiles it at run time; this checks that the source builds and that
both modes print a CLOCK_BOOTTIME time, so a broken stamper fails here and not
half-way through a bench run.
"""

import signal
import subprocess
import time

import pytest

from bench.stamp import Job, Stamper, StamperError, boottime_ns


def test_stamp_prints_the_boottime_at_its_start(stamper):
    """`stamp` prints CLOCK_BOOTTIME in ns: between the bench's before and after."""
    before = boottime_ns()
    done = subprocess.run(
        stamper.start(), capture_output=True, text=True, timeout=10, check=True
    )
    assert before <= int(done.stdout) <= boottime_ns()


def test_stamp_hold_prints_the_time_at_its_end(stamper):
    """`stamp hold` says ready with its pid, and on SIGUSR1 prints the time, exits 0."""
    proc = subprocess.Popen(stamper.hold(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        job = Job.from_ready(proc.stdout.readline())
        assert job.pid == proc.pid
        assert job.alive()
        time.sleep(0.05)  # the time printed is the end's, not the start's
        before = boottime_ns()
        job.end()
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert before <= int(out) <= boottime_ns()
        assert not job.alive()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    """Without a compiler the figure fails with a reason, not a traceback."""
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(StamperError, match="no C compiler"):
        Stamper(tmp_path).path  # noqa: B018
