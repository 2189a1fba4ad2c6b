"""The long soak: ``python -m tests.soak --minutes 30 --seed N``.

It starts its own throwaway PostgreSQL cluster (tests/pg.py; as the ``postgres``
user when run as root), runs the soak, prints the report and writes it to
``--report`` (default ``soak-seed<N>.md``), and the raw history (every child,
fault and counter) beside it as JSON. Exit status 0 if every property
held, 1 if not (the seed and the replay command are printed), 2 on a usage
error. Run it from the repository root, with the test extras installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import tests.conftest  # noqa: F401  the suite's environment scrub, as under pytest
from tests.helpers.faketime import LEFTOVERS, SHM
from tests.pg import LocalPgCluster, PgCluster, find_bindir
from tests.soak.harness import Soak, replay_command
from tests.soak.history import failure_message, render, violations
from tests.soak.nemesis import KINDS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seed", type=int, help="default: a random one, printed")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--nodes", type=int, default=4, choices=range(3, 6))
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="comma-separated fault kinds (default: all)",
    )
    parser.add_argument("--sabotage", help="a mode of tests/faults/sabotage.py")
    parser.add_argument("--dsn", help="an existing server (no restart, no freeze)")
    parser.add_argument("--report", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args(argv)
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    seed = args.seed if args.seed is not None else random.randrange(1, 10**6)
    seconds = args.seconds or (args.minutes or 2.0) * 60
    kinds = tuple(k for k in KINDS if k in args.kinds.split(","))
    directory = Path(tempfile.mkdtemp(prefix=f"leaderrun-soak-{seed}-"))
    shm_before = {p for pattern in LEFTOVERS for p in SHM.glob(pattern)}
    cluster: PgCluster
    if args.dsn:
        cluster = PgCluster(args.dsn)
    else:
        bindir = find_bindir()
        if bindir is None:
            print("no initdb/pg_ctl found; give --dsn", file=sys.stderr)
            return 2
        cluster = LocalPgCluster(bindir)
    print(f"soak seed {seed}: {seconds:g}s, {args.nodes} nodes, logs in {directory}")
    try:
        if isinstance(cluster, LocalPgCluster):
            cluster.create()
        cluster.probe()
        soak = Soak(
            cluster,
            directory,
            seed=seed,
            seconds=seconds,
            nodes=args.nodes,
            kinds=kinds,
            sabotage=args.sabotage,
            replay=replay_command(seed, seconds, args.nodes, kinds, args.sabotage),
        )
        result = soak.run()
    finally:
        if isinstance(cluster, LocalPgCluster):
            cluster.destroy()
        for path in {p for pattern in LEFTOVERS for p in SHM.glob(pattern)}:
            if path not in shm_before:  # libfaketime's, from the clock faults
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    report = render(result)
    path = args.report or Path(f"soak-seed{seed}.md")
    path.write_text(report)
    # The raw history beside it, so that a figure can be recomputed later.
    raw = path.with_suffix(".json")
    raw.write_text(json.dumps(dataclasses.asdict(result), indent=1))
    print(report)
    print(f"report written to {path}, the history to {raw}")
    found = violations(result)
    if found:
        print(failure_message(result, found), file=sys.stderr)
        print(f"logs kept in {directory}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
