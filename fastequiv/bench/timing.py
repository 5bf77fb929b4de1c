"""Timing a GPU or CPU call honestly: warm-up outside the clock, a device sync after every call.

Every timed call is followed by ``torch.cuda.synchronize()`` when its device is a GPU, so a
measured time is the whole call (launches, kernels, the copy of any host-visible result)
plus one launch round trip (~10 us on a current GPU): sizes in :mod:`.cases` start where
that is a few percent at most. The same convention holds for the pytest-benchmark suites
in ``benchmarks/`` (they time the same callables), so the CLI and pytest agree.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Stats", "synchronizer", "measure", "MODES"]

# rounds and the time budget of one case, per mode: smoke proves a case runs (one timed
# call), quick gives stable medians in a few minutes for the whole set, full more rounds.
MODES = {
    "smoke": dict(min_rounds=1, max_rounds=1, budget_s=0.0, warmup=0),
    "quick": dict(min_rounds=5, max_rounds=200, budget_s=0.25, warmup=1),
    "full": dict(min_rounds=10, max_rounds=1000, budget_s=1.0, warmup=2),
}


@dataclass
class Stats:
    """Per-call times in seconds, in the order they were measured."""

    times: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def min(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "iqr_s": self.iqr, "rounds": len(self.times)}


def synchronizer(device) -> Callable[[], None]:
    """The function that waits for ``device`` to finish its queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(fn: Callable[[], object], device, mode: str = "quick") -> Stats:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls (compilation, caches), then rounds
    of one synced call until the mode's time budget is spent (between its min and max rounds)."""
    cfg = MODES[mode]
    sync = synchronizer(device)
    for _ in range(cfg["warmup"]):
        fn()
    sync()
    stats = Stats()
    spent = 0.0
    while len(stats.times) < cfg["max_rounds"] and (len(stats.times) < cfg["min_rounds"] or spent < cfg["budget_s"]):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        stats.times.append(dt)
        spent += dt
    return stats
