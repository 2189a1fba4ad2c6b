"""The short soaks of the default suite, and the proof that the checker bites.

Each short soak runs a fixed seed's schedule of overlapping faults over three or
four contenders and asserts every property of :mod:`tests.soak.history`; a
failure message carries the seed and the command that replays it. Then the same
soak runs against deliberately broken builds (``tests/faults/sabotage.py``), and
the checker must fail each one for the right reason.
"""

from __future__ import annotations

import pytest

from tests.soak.conftest import SUMMARIES
from tests.soak.harness import Soak, replay_command
from tests.soak.history import SoakResult, failure_message, render, violations
from tests.soak.nemesis import KINDS

pytestmark = [
    pytest.mark.pg,
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.timeout(300),
]

SHORT_S = 35.0
"""Each short soak's nemesis; seeds 9 and 44 draw every kind of fault between them."""

BROKEN_S = 15.0


def soak(
    pg_cluster,
    tmp_path,
    seed: int,
    seconds: float,
    nodes: int,
    kinds=KINDS,
    sabotage: str | None = None,
) -> SoakResult:
    """Run one soak and note its figures for the session's summary."""
    made = Soak(
        pg_cluster,
        tmp_path,
        seed=seed,
        seconds=seconds,
        nodes=nodes,
        kinds=kinds,
        sabotage=sabotage,
        replay=replay_command(seed, seconds, nodes, kinds, sabotage),
    )
    result = made.run()
    SUMMARIES.append(summary(result))
    return result


def summary(result: SoakResult) -> str:
    counters = {c.kind: c for c in result.counters}
    lost = ", ".join(
        f"{kind} lost {counters[kind].lost}/{counters[kind].committed}"
        for kind in ("fenced", "unfenced")
        if kind in counters
    )
    verdict = "PASS" if not violations(result) else "FAIL"
    broken = f" sabotage {result.sabotage}" if result.sabotage else ""
    return (
        f"seed {result.seed}{broken}: {verdict} in {result.wall_s:.0f}s, "
        f"{len(result.children)} children, {len(result.faults)} faults, {lost}"
    )


@pytest.mark.parametrize(("seed", "nodes"), [(9, 3), (44, 4)])
def test_short_soak(pg_cluster, faketime, tmp_path, seed, nodes):
    """Under a seeded schedule of overlapping faults, no two children ran at once,
    tokens strictly increased, the lock was retaken after the last heal, and no
    fenced increment was lost."""
    result = soak(pg_cluster, tmp_path, seed, SHORT_S, nodes)
    found = violations(result)
    assert found == [], failure_message(result, found) + "\n" + render(result)
    # A soak that did nothing proves nothing.
    assert len(result.faults) >= 5, render(result)
    assert len(result.children) >= 5, render(result)
    assert all(c.committed > 0 for c in result.counters), render(result)


@pytest.mark.parametrize(
    ("sabotage", "seed", "kinds", "caught"),
    [
        # Seed 41 partitions the holder for 2.3 leases from 4.3 s on; a holder
        # that keeps its child past its lease, the job stuck on the same
        # partition, still has it alive when the next one starts.
        ("no-deadline", 41, ("partition",), "overlap: "),
        # Tokens restart at 1 after every release; no fault is needed.
        ("delete-on-release", 7, ("reset",), "reused"),
    ],
)
def test_the_checker_fails_a_broken_build(
    pg_cluster, tmp_path, sabotage, seed, kinds, caught
):
    """Against a leaderrun broken on purpose, the soak fails, for the right
    reason, and its message names the seed and the command that replays it."""
    result = soak(pg_cluster, tmp_path, seed, BROKEN_S, 3, kinds, sabotage)
    found = violations(result)
    assert any(caught in line for line in found), render(result)
    message = failure_message(result, found)
    assert f"soak seed {seed} " in message
    assert (
        f"replay: python -m tests.soak --seed {seed} --seconds {BROKEN_S:g} "
        f"--nodes 3 --kinds {','.join(kinds)} --sabotage {sabotage}"
    ) in message
