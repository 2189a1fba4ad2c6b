"""The nemesis: a seeded schedule of overlapping faults, and the hands that inject them.

:func:`schedule` is pure: the same seed gives the same faults, at the same
offsets, with the same durations and parameters. Where a fault aims at "the
holder", who that is is decided when it fires, from the timeline; the report
says whom it hit. Real processes decide the rest of the interleaving, so a
replay repeats the schedule, not every microsecond.

Kinds (durations are in leases, drawn per fault):

============== ===============================================================
kill9          ``kill -9`` of leaderrun (its node's loop starts another)
partition      the node's proxy blackholes (no RST, no FIN), then heals
delay          the node's proxy holds every byte, then delivers them late: a
               stalled middlebox (a paused PgBouncer); a write in flight
               lands after its writer was stopped
reset          every connection through the node's proxy gets an RST
stop           SIGSTOP of leaderrun, SIGCONT later (its watchdog stays up)
stop-backend   SIGSTOP of the server processes serving the node
restart        the server stops (fast, or immediate: a crash), stays down,
               starts again
freeze         SIGSTOP of the postmaster and every backend, SIGCONT later
release-force ``leaderrun release --force`` of the lock
clock          the node's next runs start with libfaketime's wall clock off
               by seconds to hours
stderr-stall   the reader of the node's stderr stops; the pipe fills
cpu-hog        a busy loop on the CPU the holder last ran on
============== ===============================================================

``restart``, ``freeze`` and ``stop-backend`` are server faults: never two at
once (pg_ctl cannot stop a server whose processes are stopped).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS: tuple[str, ...] = (
    "kill9",
    "partition",
    "delay",
    "reset",
    "stop",
    "stop-backend",
    "restart",
    "freeze",
    "release-force",
    "clock",
    "stderr-stall",
    "cpu-hog",
)

SERVER_KINDS = frozenset({"restart", "freeze", "stop-backend"})
"""Faults of the server itself, never two at once."""

LOCAL_ONLY_KINDS = frozenset({"restart", "freeze"})
"""Faults that need a server this process owns (tests/pg.py's local cluster)."""

WEIGHTS = {
    "kill9": 2,
    "partition": 3,
    "delay": 3,
    "reset": 2,
    "stop": 2,
    "stop-backend": 2,
    "restart": 1,
    "freeze": 1,
    "release-force": 2,
    "clock": 1,
    "stderr-stall": 1,
    "cpu-hog": 1,
}
"""How often each kind is drawn, relative to the others."""

DURATION_LEASES = {
    "partition": (0.3, 2.5),
    "delay": (0.3, 2.5),
    "stop": (0.3, 2.0),
    "stop-backend": (0.3, 2.0),
    "restart": (0.0, 1.2),
    "freeze": (0.2, 1.5),
    "clock": (2.0, 6.0),
    "stderr-stall": (1.0, 4.0),
    "cpu-hog": (1.0, 4.0),
}
"""Each lasting kind's duration range, in leases; the others are instants."""

MEAN_GAP_LEASES = 0.75
"""Mean time between two faults' starts: shorter than most faults, so they overlap."""

HOLDER_SHARE = 0.7
"""How often a node fault aims at whoever holds the lock when it fires."""

CLOCK_OFFSETS = ("+1h", "-1h", "+10m", "-10m", "+90s", "-90s", "+3s", "-3s")


@dataclass(frozen=True)
class Fault:
    """One scheduled fault, ``at_s`` seconds after the soak began."""

    at_s: float
    kind: str
    target: str
    """``holder``, a node (``n2``), ``server`` or ``lock``."""
    duration_s: float
    param: str = ""
    """The clock offset, or the restart's stop mode."""


def schedule(
    seed: int, seconds: float, nodes: int, lease_s: float, kinds: tuple[str, ...]
) -> list[Fault]:
    """The faults of seed ``seed``: all of them healed by ``seconds``."""
    rng = random.Random(seed)
    weights = [WEIGHTS[k] for k in kinds]
    faults: list[Fault] = []
    server_free_s = 0.0
    at_s = rng.uniform(0.5, 1.5) * lease_s  # a first holder, before the first fault
    while kinds:
        at_s += rng.expovariate(1 / (MEAN_GAP_LEASES * lease_s))
        if at_s >= seconds:
            break
        kind = rng.choices(kinds, weights)[0]
        low, high = DURATION_LEASES.get(kind, (0.0, 0.0))
        duration_s = rng.uniform(low, high) * lease_s
        param = ""
        if kind == "clock":
            param = rng.choice(CLOCK_OFFSETS)
        elif kind == "restart":
            param = rng.choice(("fast", "immediate"))
        if kind in ("restart", "freeze", "release-force"):
            target = "server" if kind != "release-force" else "lock"
        elif rng.random() < HOLDER_SHARE:
            target = "holder"
        else:
            target = f"n{rng.randrange(nodes)}"
        if at_s + duration_s > seconds:
            continue  # it would not heal in time; a shorter one may
        if kind in SERVER_KINDS:
            if at_s < server_free_s:
                continue  # drawn, but another server fault is still on
            # A restart's start-up takes a moment beyond its outage.
            server_free_s = at_s + duration_s + lease_s / 2
        faults.append(Fault(round(at_s, 3), kind, target, round(duration_s, 3), param))
    return faults
