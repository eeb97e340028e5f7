"""Route statistics: the frozen snapshot of one route's counters, and how snapshots add up.

This module owns what a statistic is. Adding one means adding a field to RouteStatistics here:
merge() adds up every field by its type (integers and floats add, tuples add element by element,
dicts add per key), so the worker processes' snapshots and the metrics exposition need no edit
beyond naming the new series. It is pure: no trio, no sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

#: Upper bounds (seconds) of the connect latency histogram's buckets; a last bucket is +Inf.
CONNECT_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.frozen
class RouteStatistics:
    """A snapshot of one route's counters."""

    accepted: int
    active: int
    refused: int
    failed: int
    bytes_in: int
    bytes_out: int
    #: Ended connections per EndReason label (relay/ends.py), e.g. `closed_by_client`.
    closed: dict[str, int]
    #: Successful backend connects per CONNECT_LATENCY_BUCKETS bucket (not cumulative; last is +Inf).
    connect_buckets: tuple[int, ...] = (0,) * (len(CONNECT_LATENCY_BUCKETS) + 1)
    connect_seconds: float = 0.0


Snapshot = Mapping[str, RouteStatistics]


def _add(a: object, b: object) -> object:
    if isinstance(a, dict) and isinstance(b, dict):
        total = dict(a)
        for key, count in b.items():
            total[key] = total.get(key, 0) + count
        return total
    if isinstance(a, tuple) and isinstance(b, tuple):
        return tuple(x + y for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    raise TypeError(f"RouteStatistics cannot add {type(a).__name__} values; teach stats._add how")


def merge(a: RouteStatistics, b: RouteStatistics) -> RouteStatistics:
    """One route's counters from two processes, added up field by field."""
    fields = attrs.fields(RouteStatistics)
    return RouteStatistics(**{f.name: _add(getattr(a, f.name), getattr(b, f.name)) for f in fields})  # type: ignore[arg-type]


def merge_all(snapshots: Iterable[Snapshot]) -> dict[str, RouteStatistics]:
    """Several processes' snapshots added up route by route."""
    total: dict[str, RouteStatistics] = {}
    for snapshot in snapshots:
        for name, stats in snapshot.items():
            total[name] = merge(total[name], stats) if name in total else stats
    return total


def retired(snapshot: Snapshot) -> dict[str, RouteStatistics]:
    """The counters a finished process leaves behind: everything but its open connections."""
    return {name: attrs.evolve(stats, active=0) for name, stats in snapshot.items()}
