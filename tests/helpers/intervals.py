"""Running intervals that must not overlap: the property of the fault suite and bench.

Pure: it takes the intervals as numbers and reads no clock, so the fault suite's
timeline (``tests/faults/conftest.py``) and the bench's scale run
(``bench/scale.py``) share one definition of an overlap, and the unit tests
check it directly (``tests/unit/test_intervals.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

NOT_ENDED = float("inf")
"""The end of an interval that has not ended (still running, or never seen to end)."""


@dataclass(frozen=True)
class Overlap(Generic[K]):
    """Two neighbours in start order: the earlier ended after the later began.

    Attributes:
        earlier: the key of the interval that started first.
        later: the key of the interval that started next.
        earlier_end: when ``earlier`` ended (:data:`NOT_ENDED` if it has not).
        later_start: when ``later`` started.
    """

    earlier: K
    later: K
    earlier_end: float
    later_start: float


def find_overlaps(spans: Mapping[K, tuple[float, float]]) -> list[Overlap[K]]:
    """Each pair of neighbours in start order whose intervals overlap, in start order.

    ``spans`` maps a key (a fencing token) to its ``(start, end)``, in any unit;
    an end of :data:`NOT_ENDED` overlaps every later start. Touching is not
    overlapping: an interval may start at the very instant the previous one ended.
    Equal starts keep the order of ``spans``.

    Only neighbours are compared, and that is enough: if any two intervals overlap,
    the first of them overlaps its own next neighbour too, so the list is empty
    if and only if no two intervals overlap. Integers stay integers (nanosecond
    stamps are compared exactly).
    """
    in_start_order = sorted(spans.items(), key=lambda item: item[1][0])
    found = []
    for (earlier, (_, end)), (later, (start, _)) in itertools.pairwise(in_start_order):
        if end > start:
            found.append(Overlap(earlier, later, end, start))
    return found
