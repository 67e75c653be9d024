"""The clock: the run's time budget, planned from how long evaluations have taken.

A batch of evaluations runs on `workers` at once, so n evaluations take about
ceil(n / workers) times one evaluation. Before a timed batch the clock says how many of its
evaluations fit in the time left, after keeping back what finishing the run needs: the
selection's evaluations on the held-back documents, the winner's on the holdout tasks, and
writing the winner to disk.
"""

import math
import time
from typing import Dict, List, Optional

from mergekit_recycle.records import Split

# Writing the winner to disk reads its checkpoints and writes one; assume at least this rate.
DISK_BYTES_PER_SECOND = 200 * 2**20


class OutOfTime(Exception):
    """The time budget leaves no room for another evaluation."""


class Clock:
    """When the run started, its time budget, and the durations of the evaluations so far, by split."""

    def __init__(self, time_budget: Optional[float], started: float, durations: Dict[Split, List[float]],
                 bytes_to_write: int = 0, finishing: int = 0, holdback: float = 0.0):
        self.time_budget = time_budget  # seconds, None: no limit
        self.started = started  # time.monotonic()
        self.durations = durations  # earlier sessions' too, so that a resumed run plans from its start
        self.bytes_to_write = bytes_to_write  # the winner's size times the checkpoints read to write it
        self.finishing = finishing  # evaluations on the held-back documents that finishing needs
        self.holdback = holdback

    def record(self, split: Split, seconds: float) -> None:
        self.durations.setdefault(split, []).append(seconds)

    def estimate(self, split: Split) -> float:
        """One evaluation on `split`: the mean of the latest five (0 before the first)."""
        recent = self.durations.get(split, [])[-5:]
        return sum(recent) / len(recent) if recent else 0.0

    def reserve(self, workers: int = 1) -> float:
        """What finishing the run takes: the selection, the winner's holdout score, writing it, and a margin."""
        selection = self.estimate("selection")
        if not selection and self.holdback:  # not measured yet: as the search tasks, scaled to the held-back share
            selection = self.estimate("search") * self.holdback / (1 - self.holdback)
        return (math.ceil(self.finishing / workers) * selection + self.estimate("holdout")
                + self.bytes_to_write / DISK_BYTES_PER_SECOND + max(5.0, 0.02 * (self.time_budget or 0.0)))

    def fitting(self, split: Split, count: int, workers: int = 1) -> int:
        """How many of `count` evaluations on `split`, on `workers` at once, fit in the time left (all of them
        without a budget). OutOfTime when not even one does."""
        if self.time_budget is None or count == 0:
            return count
        left = self.time_budget - (time.monotonic() - self.started) - self.reserve(workers)
        each = self.estimate(split)
        if each <= 0:  # nothing measured yet: one round, to measure
            fit = min(count, workers) if left > 0 else 0
        else:
            fit = min(count, int(max(left, 0.0) // each) * workers)
        if fit == 0:
            raise OutOfTime
        return fit
