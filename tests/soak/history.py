"""The soak's checker: what happened, judged without asking leaderrun.

Pure: it takes what the harness observed (each child's start as the child wrote
it, its death as a pidfd reported it, the faults as the nemesis injected them,
the counters as the database holds them) and reads no clock. Nothing here comes
from leaderrun's own bookkeeping (its logs, its lease or history tables).

The properties:

- **no overlap**: no two children of the lock were alive at the same moment.
  A child's interval runs from its own first word (before it touched the
  database) to its death as the pidfd saw it, never to its own last word, which
  a SIGKILLed child does not get to say.
- **tokens strictly increase** in start order: a token seen twice, or a smaller
  one after a larger, is a fencing token that no longer fences.
- **liveness**: after the last fault healed, a child runs again within one
  lease plus jitter plus :data:`START_ALLOWANCE_S`.
- **no fenced lost update**: every increment that committed is in the fenced
  counter. The unfenced counter's losses are reported, not judged.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.helpers.intervals import NOT_ENDED, find_overlaps

START_ALLOWANCE_S = 1.0
"""Added to the liveness bound: a Python job's start on a loaded 2-core host, and
the harness's own view of it."""


@dataclass(frozen=True)
class Child:
    """One job process: its token, node, and its life on CLOCK_BOOTTIME."""

    token: int
    pid: int
    node: str
    start_s: float
    end_s: float = NOT_ENDED
    finished: bool = False
    """Whether it wrote ``end`` itself (it was not stopped)."""


@dataclass(frozen=True)
class FaultRecord:
    """One fault as the nemesis carried it out."""

    kind: str
    target: str
    """The node it hit (``n0``...), ``server`` or ``lock``."""
    injected_s: float
    healed_s: float
    detail: str = ""


@dataclass(frozen=True)
class CounterCheck:
    """One shared counter at the end: its value, and the increments that committed."""

    kind: str
    value: int
    committed: int
    refused: int = 0
    """Increments the fence refused to a job that was still running to see it
    (fenced counter only). A stale write that lands after its job died is
    refused, or waits for the fence, in the server, unseen by anyone."""

    @property
    def lost(self) -> int:
        """Committed increments the counter does not show."""
        return self.committed - self.value


@dataclass
class SoakResult:
    """Everything one soak observed, and its configuration."""

    seed: int
    nodes: int
    seconds: float
    lease_s: float
    liveness_bound_s: float
    replay: str
    sabotage: str | None = None
    children: list[Child] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    exits: dict[str, int] = field(default_factory=dict)
    """leaderrun's exit statuses, and how often each."""
    counters: list[CounterCheck] = field(default_factory=list)
    start_s: float = 0.0
    wall_s: float = 0.0
    machine: str = ""
    errors: list[str] = field(default_factory=list)
    """Exceptions in the harness's own threads: a soak that could not do its work."""

    @property
    def last_heal_s(self) -> float:
        """When the last fault healed (the start, if there was none)."""
        return max((f.healed_s for f in self.faults), default=self.start_s)


def overlaps(children: Sequence[Child]) -> list[str]:
    """Each pair of neighbours in start order that were alive at the same moment."""
    spans = {i: (c.start_s, c.end_s) for i, c in enumerate(children)}
    found = []
    for o in find_overlaps(spans):
        a, b = children[o.earlier], children[o.later]
        ran = (
            "was never seen to end"
            if a.end_s == NOT_ENDED
            else f"ended {a.end_s - b.start_s:.3f}s"
        )
        found.append(
            f"overlap: token {a.token} (pid {a.pid}, {a.node}) {ran} after "
            f"token {b.token} (pid {b.pid}, {b.node}) started"
        )
    return found


def token_order(children: Sequence[Child]) -> list[str]:
    """Each child whose token is not greater than the one that started before it."""
    in_order = sorted(children, key=lambda c: c.start_s)
    return [
        f"token {b.token} (pid {b.pid}, {b.node}) started after token {a.token} "
        f"(pid {a.pid}, {a.node}): "
        + ("reused" if b.token == a.token else "went backwards")
        for a, b in itertools.pairwise(in_order)
        if b.token <= a.token
    ]


def retaken_after_s(children: Sequence[Child], at_s: float) -> float | None:
    """How long after ``at_s`` a child ran: 0 if one was running; None if none."""
    if any(c.start_s <= at_s < c.end_s for c in children):
        return 0.0
    later = [c.start_s - at_s for c in children if c.start_s >= at_s]
    return min(later, default=None)


def failovers_s(
    children: Sequence[Child], faults: Sequence[FaultRecord], lease_s: float
) -> list[float]:
    """For each child that was stopped: from the fault that stopped it to the next
    child's start.

    The fault that stopped it is the first injected in the last lease of its
    life and aimed at its node, the server or the lock: every fault stops a
    child within a lease or not at all (the kill deadline and the grace fit in
    one), and one before that was ridden out. Children that ended by themselves,
    or that no fault hit (a job the database failed), have no failover.
    """
    in_order = sorted(children, key=lambda c: c.start_s)
    found = []
    for child, nxt in itertools.pairwise(in_order):
        if child.finished:
            continue
        since_s = max(child.start_s, child.end_s - lease_s)
        hits = [
            f.injected_s
            for f in faults
            if since_s <= f.injected_s < child.end_s
            and f.target in (child.node, "server", "lock")
        ]
        if hits:
            found.append(nxt.start_s - min(hits))
    return found


def violations(result: SoakResult) -> list[str]:
    """Every property the soak broke, one line each; empty if it passed."""
    children = sorted(result.children, key=lambda c: c.start_s)
    found = overlaps(children) + token_order(children)
    found += [f"harness error: {error.strip()}" for error in result.errors]
    if not children:
        found.append("no child ever ran")
    retaken = retaken_after_s(children, result.last_heal_s)
    if retaken is None or retaken > result.liveness_bound_s:
        seen = "never" if retaken is None else f"after {retaken:.2f}s"
        found.append(
            f"liveness: after the last heal a child ran {seen}, bound "
            f"{result.liveness_bound_s:.2f}s"
        )
    for counter in result.counters:
        if counter.kind == "fenced" and counter.lost != 0:
            found.append(
                f"fenced counter: {counter.committed} increments committed, value "
                f"{counter.value}: {counter.lost} lost"
            )
        if counter.lost < 0:
            found.append(f"{counter.kind} counter is above its committed increments")
    return found


def failure_message(result: SoakResult, found: Sequence[str]) -> str:
    """What a failed soak says: the seed, each violation, the replay command."""
    shown = "\n".join(f"  {line}" for line in found[:20])
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    return (
        f"soak seed {result.seed} ({result.nodes} nodes, {result.seconds:g}s"
        f"{', sabotage ' + result.sabotage if result.sabotage else ''}) "
        f"broke {len(found)} propert{'y' if len(found) == 1 else 'ies'}:\n"
        f"{shown}{more}\nreplay: {result.replay}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank; nan when empty."""
    if not values:
        return float("nan")
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))]


def render(result: SoakResult) -> str:
    """The soak's report, in Markdown."""
    found = violations(result)
    lease = result.lease_s
    fail = [s / lease for s in failovers_s(result.children, result.faults, lease)]
    by_kind = Counter(f.kind for f in result.faults)
    counters = {c.kind: c for c in result.counters}
    children = sorted(result.children, key=lambda c: c.start_s)
    retaken = retaken_after_s(children, result.last_heal_s)
    lines = [
        f"# leaderrun soak, seed {result.seed}",
        "",
        f"- machine: {result.machine}",
        f"- {result.nodes} contenders, lease {lease:g}s, nemesis for "
        f"{result.seconds:g}s, wall time {result.wall_s:.0f}s",
        f"- replay: `{result.replay}`",
        f"- verdict: {'PASS' if not found else 'FAIL'}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| leaderrun runs | {sum(result.exits.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(result.exits.items()))}) |",
        f"| children started | {len(result.children)} "
        f"({sum(not c.finished for c in result.children)} stopped) |",
        f"| faults | {len(result.faults)} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}) |",
        f"| overlaps | {len(overlaps(children))} |",
        f"| token order violations | {len(token_order(children))} |",
    ]
    for kind in ("fenced", "unfenced"):
        if kind in counters:
            c = counters[kind]
            refused = (
                f", {c.refused} refused to a job still running"
                if kind == "fenced"
                else ""
            )
            lines.append(
                f"| lost updates, {kind} | {c.lost} of {c.committed} "
                f"committed{refused} |"
            )
    if fail:
        lines.append(
            f"| failover / lease (n={len(fail)}) | median "
            f"{statistics.median(fail):.2f}, p95 {percentile(fail, 0.95):.2f}, "
            f"max {max(fail):.2f} |"
        )
    lines.append(
        "| retaken after the last heal | "
        + ("never" if retaken is None else f"{retaken:.2f}s")
        + f" (bound {result.liveness_bound_s:.2f}s) |"
    )
    if found:
        lines += ["", "## Violations", "", *(f"- {line}" for line in found)]
    lines += [
        "",
        "## Faults",
        "",
        "| at (s) | kind | target | lasted (s) | detail |",
        "|---|---|---|---|---|",
        *(
            f"| {f.injected_s - result.start_s:.1f} | {f.kind} | {f.target} "
            f"| {f.healed_s - f.injected_s:.1f} | {f.detail} |"
            for f in result.faults
        ),
    ]
    return "\n".join(lines) + "\n"
