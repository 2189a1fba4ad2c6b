"""Start-up: ``leaderrun -- true`` against the baseline script, and ``--help``.

Wall and CPU time of each command, median of ``runs`` runs, interleaved (every
round runs each command once, in alternating order) so that the machine's other
load falls on all of them alike.
"""

from __future__ import annotations

import statistics
import sys

from bench.baseline_script import RSS_RUNS, BaselineScript
from bench.common import (
    LEADERRUN,
    Finished,
    leaderrun_argv,
    median_ms,
    peak_rss_kb,
    run_timed,
)
from bench.report import Goal, Results

RATIO = Goal("ratio", 1.10)
"""leaderrun's start-up against the baseline script's, wall time."""

WARM_ROUNDS = 2


def run(dsn: str, runs: int, baseline: BaselineScript, out: Results) -> None:
    """Time the commands, then compare leaderrun's peak RSS with the script's."""
    print(f"start-up: {runs} runs each, interleaved")
    commands = {
        "leaderrun": leaderrun_argv(dsn, "bench-startup", "--", "true"),
        "baseline": baseline.argv(),
        "import psycopg": [sys.executable, "-c", "import psycopg"],
        "leaderrun --help": [LEADERRUN, "--help"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    timings = interleaved(commands, runs)
    wall = {n: median_ms([t.wall_s for t in ts]) for n, ts in timings.items()}
    cpu = {n: median_ms([t.cpu_s for t in ts]) for n, ts in timings.items()}
    ratio = wall["leaderrun"] / wall["baseline"]
    out.check(
        f"start-up, `leaderrun --lock-id X -- true` (median wall of {runs})",
        f"{wall['leaderrun']:.0f} ms",
        f"{wall['baseline']:.0f} ms",
        RATIO,
        ratio,
        shown=f"{ratio:.2f}",
    )
    out.add(
        f"start-up, CPU time (median of {runs})",
        f"{cpu['leaderrun']:.0f} ms",
        f"{cpu['baseline']:.0f} ms",
        "(same ratio)",
        f"{cpu['leaderrun'] / cpu['baseline']:.2f}",
    )
    out.add(
        "`leaderrun --help` (median wall)",
        f"{wall['leaderrun --help']:.0f} ms",
        f"`import psycopg` {wall['import psycopg']:.0f} ms, "
        f"`python -c pass` {wall['python -c pass']:.0f} ms",
        "no psycopg, no rich",
        "yes (tests/unit/test_lean_startup.py)",
    )
    rss = baseline.peak_rss_kb()
    lr_rss = statistics.median(
        peak_rss_kb(commands["leaderrun"]) for _ in range(RSS_RUNS)
    )
    out.notes.append(
        f"Peak RSS of one `leaderrun -- true`: {lr_rss / 1024:.1f} MiB; of the "
        f"baseline script: {rss / 1024:.1f} MiB (medians of {RSS_RUNS})."
    )


def interleaved(commands: dict[str, list[str]], runs: int) -> dict[str, list[Finished]]:
    """Each command's ``runs`` timings, after warming up; any failure is an error."""
    timings: dict[str, list[Finished]] = {name: [] for name in commands}
    for _ in range(WARM_ROUNDS):  # the page cache and the server's catalog caches
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
    return timings
