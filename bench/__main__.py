"""``python -m bench``: leaderrun's cost and speed, each against a baseline.

Runs against a throwaway PostgreSQL cluster (``initdb``/``pg_ctl``, as the test
suite does) or ``--dsn``, and writes ``bench/RESULTS.md`` with the machine
described. Every figure is measured in the same run as its baseline.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    failover,
    fairness,
    handoff,
    peers,
    pgbouncer,
    scale,
    sizing,
    startup,
    statements,
)
from bench.baseline_script import BaselineScript  # noqa: E402
from bench.cluster import postgres  # noqa: E402
from bench.report import Results, machine, results_md  # noqa: E402
from bench.stamp import Stamper  # noqa: E402
from leaderrun.stores.postgres import PostgresLeaseStore  # noqa: E402

if TYPE_CHECKING:
    from tests.pg import LocalPgCluster

FIGURES = (
    "startup",
    "handoff",
    "pgbouncer",
    "failover",
    "peers",
    "statements",
    "fairness",
    "sizing",
    "scale",
)
"""Every figure, in the order a run measures them."""

MAX_CONNECTIONS = 1000
"""The throwaway server's limit: 200 leaderruns hold one connection each, the
replacements of exited ones overlap them, and the bench has its own."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bench's options; ``argv`` defaults to the command line's."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--dsn", help="use this server instead of a throwaway cluster")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--runs", type=int, default=21, help="start-up runs (>= 20)")
    parser.add_argument("--handoffs", type=int, default=15)
    parser.add_argument("--fair-handoffs", type=int, default=40)
    parser.add_argument("--bouncer-handoffs", type=int, default=9)
    parser.add_argument("--sizing-count", type=int, default=500)
    parser.add_argument("--scale-procs", type=int, default=200)
    parser.add_argument("--scale-locks", type=int, default=20)
    parser.add_argument("--scale-seconds", type=float, default=150.0)
    # Long enough that the 200 processes spend their time waiting, not starting:
    # each replacement costs a Python start-up, and the machine may have 2 cores.
    parser.add_argument("--scale-job", type=float, default=6.0, help="job length, s")
    parser.add_argument(
        "--failover-leases", type=float, nargs="+", default=[5.0, 5.0, 5.0, 30.0]
    )
    parser.add_argument(
        "--peer-runs", type=int, default=21, help="peers: start-up runs per tool"
    )
    parser.add_argument(
        "--peer-handoffs", type=int, default=20, help="peers: hand-offs per tool"
    )
    parser.add_argument(
        "--peer-failovers", type=int, default=3, help="peers: kill -9 runs per tool"
    )
    parser.add_argument(
        "--peer-pauses", type=int, default=2, help="peers: coordinator pauses per tool"
    )
    parser.add_argument("--only", nargs="*", default=None, choices=FIGURES)
    return parser.parse_args(argv)


def wanted(args: argparse.Namespace) -> list[str]:
    """The figures to measure, in run order: those of ``--only``, or all."""
    return [figure for figure in FIGURES if figure in (args.only or FIGURES)]


def run_figures(
    args: argparse.Namespace,
    dsn: str,
    cluster: LocalPgCluster | None,
    out: Results,
) -> None:
    """Measure the wanted figures on the server ``dsn`` into ``out``."""
    figures = wanted(args)
    # Start-up and scale share the baseline script; it is measured once, by the
    # first of them to need it. The stamper is compiled once, by the first
    # hand-off figure, into a directory removed at the end.
    with (
        BaselineScript(dsn) as baseline,
        tempfile.TemporaryDirectory(prefix="bench-stamp-") as stamp_dir,
    ):
        stamper = Stamper(Path(stamp_dir))
        if "startup" in figures:
            startup.run(dsn, args.runs, baseline, out)
        if "handoff" in figures:
            handoff.run(dsn, args.handoffs, stamper, out)
        if "pgbouncer" in figures:
            pgbouncer.run(dsn, args.bouncer_handoffs, stamper, out)
        if "failover" in figures:
            failover.run(dsn, args.failover_leases, out)
        if "peers" in figures:
            peers.run(
                dsn,
                cluster,
                stamper,
                out,
                runs=args.peer_runs,
                handoffs=args.peer_handoffs,
                failovers=args.peer_failovers,
                pauses=args.peer_pauses,
            )
        if "statements" in figures:
            statements.run(dsn, out)
        if "fairness" in figures:
            fairness.run(dsn, args.fair_handoffs, out)
        if "sizing" in figures:
            sizing.run(dsn, cluster, args.sizing_count, out)
        if "scale" in figures:
            scale.run(
                dsn,
                cluster,
                args.scale_procs,
                args.scale_locks,
                args.scale_seconds,
                args.scale_job,
                baseline,
                out,
            )


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, then write RESULTS.md (``--out``)."""
    args = parse_args(argv)
    # SIGTERM (as from `timeout`) unwinds like an error: every `finally` runs,
    # so no cluster, etcd or stopped coordinator outlives the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Bytecode as an installed package has it (pip compiles on install); with
    # PYTHONDONTWRITEBYTECODE set, an editable install would recompile each run.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "leaderrun")], check=True
    )
    out = Results()
    load_before = os.getloadavg()
    began = time.monotonic()
    with postgres(args.dsn, max_connections=MAX_CONNECTIONS) as (dsn, cluster):
        PostgresLeaseStore(dsn).init()
        described = machine(dsn)
        run_figures(args, dsn, cluster, out)
    load_after = os.getloadavg()
    text = results_md(
        out,
        argv=sys.argv[1:] if argv is None else argv,
        took_s=time.monotonic() - began,
        described=described,
        load_before=load_before,
        load_after=load_after,
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
