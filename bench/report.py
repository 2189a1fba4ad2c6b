"""RESULTS.md: each figure's row, its goal written once, and the machine it ran on."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from bench.common import admin
from leaderrun import __version__


def verdict(ok: bool) -> str:
    """A goal's verdict as RESULTS.md shows it: a miss stands out."""
    return "yes" if ok else "**no**"


@dataclass(frozen=True)
class Goal:
    """A figure's goal, written once: RESULTS.md's goal column, and its check.

    It reads ``metric op limit unit``: ``Goal("ratio", 1.15)`` is "ratio <= 1.15",
    ``Goal("median", 50, "<", "ms")`` is "median < 50 ms", and a goal on the
    figure itself has no metric: ``Goal("", 1.2, unit="x")`` is "<= 1.2 x".
    ``==`` counts: ``Goal("each", 1, "==")`` is "1 each", ``Goal("errors", 0,
    "==")`` "zero errors". ``about`` is a target with room: ``Goal("", 1,
    "about", slack=0.5)`` reads "about 1" and is met up to 1.5.
    """

    metric: str
    limit: float
    op: Literal["<", "<=", "==", "about"] = "<="
    unit: str = ""
    slack: float = 0.0

    def __str__(self) -> str:
        limit = f"{self.limit:g}" + (f" {self.unit}" if self.unit else "")
        if self.op == "==":
            count = "zero" if self.limit == 0 else limit
            return f"{count} {self.metric}"
        if self.op == "about":
            return f"about {limit}"
        return f"{self.metric} {self.op} {limit}".lstrip()

    def met(self, *values: float) -> bool:
        """Whether every one of ``values`` meets the goal."""
        return all(self._met(value) for value in values)

    def _met(self, value: float) -> bool:
        if self.op == "<":
            return value < self.limit
        if self.op == "<=":
            return value <= self.limit
        if self.op == "==":
            return value == self.limit
        return value <= self.limit + self.slack


PEERS = ("leaderrun", "etcdctl lock", "flock")
"""The columns of the second table, "leaderrun beside its peers"."""


@dataclass
class Results:
    """Every figure, with the lines of RESULTS.md it becomes.

    ``rows`` are the first table's (leaderrun against its baselines);
    ``peers`` the second's: a figure, then one cell per tool of :data:`PEERS`.
    """

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peers: list[tuple[str, ...]] = field(default_factory=list)

    def add(
        self, figure: str, value: str, baseline: str, goal: str = "-", met: str = "-"
    ) -> None:
        """A row whose goal, if any, is text: nothing here checks it."""
        self.rows.append((figure, value, baseline, goal, met))
        print(f"  {figure}: {value} (baseline {baseline}; goal {goal}: {met})")

    def beside(self, figure: str, *cells: str) -> None:
        """A row of the peers table: one cell per tool, in :data:`PEERS` order."""
        if len(cells) != len(PEERS):
            raise ValueError(f"{figure}: {len(cells)} cells for {len(PEERS)} tools")
        self.peers.append((figure, *cells))
        print(f"  {figure}:")
        for tool, cell in zip(PEERS, cells, strict=True):
            print(f"    {tool}: {cell}")

    def check(
        self,
        figure: str,
        value: str,
        baseline: str,
        goal: Goal,
        measured: float,
        shown: str = "",
    ) -> None:
        """A row with a goal: ``measured`` is checked against it.

        The met column is the verdict, after ``shown`` (the measured value as
        the row should show it) if given.
        """
        met = verdict(goal.met(measured))
        self.add(
            figure, value, baseline, str(goal), f"{shown}: {met}" if shown else met
        )


def machine(dsn: str) -> list[str]:
    """The lines of RESULTS.md that describe the machine and the server."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    with admin(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    server = "unknown" if row is None else row[0]
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- Python {platform.python_version()}, psycopg {version('psycopg')}, "
        f"typer {version('typer')}, leaderrun {__version__}",
        f"- PostgreSQL {server} on loopback",
    ]


LoadAverage = tuple[float, float, float]


def results_md(
    out: Results,
    *,
    argv: Sequence[str],
    took_s: float,
    described: list[str],
    load_before: LoadAverage,
    load_after: LoadAverage,
) -> str:
    """The text of RESULTS.md: how it was written, the machine, the table, the notes."""
    return "\n".join(
        [
            "# leaderrun benchmark results",
            "",
            "Written by `python -m bench"
            + "".join(f" {arg}" for arg in argv)
            + f"`; took {took_s:.0f} s.",
            "",
            *described,
            f"- load average (1, 5, 15 min) before: {_load(load_before)}; "
            f"after: {_load(load_after)} "
            "(other work on the machine shares its cores)",
            "",
            "| figure | leaderrun | baseline | goal | met |",
            "|---|---|---|---|---|",
            *(f"| {' | '.join(row)} |" for row in out.rows),
            "",
            *(f"- {note}" for note in out.notes),
            "",
            *peers_md(out),
        ]
    )


def peers_md(out: Results) -> list[str]:
    """The second table, "leaderrun beside its peers", if the run measured it."""
    if not out.peers:
        return []
    return [
        "## leaderrun beside its peers",
        "",
        "Measured in the same run, one tool after the other in each round "
        "(bench/peers.py; what each row means is in bench/README.md).",
        "",
        f"| figure | {' | '.join(PEERS)} |",
        "|---" * (len(PEERS) + 1) + "|",
        *(f"| {' | '.join(row)} |" for row in out.peers),
        "",
    ]


def _load(average: LoadAverage) -> str:
    return ", ".join(f"{x:.2f}" for x in average)
