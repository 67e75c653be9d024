"""Choosing the winner: the search's best merges against the baselines, on documents the search never saw.

The best of a few hundred noisy scores is biased upward (the winner's curse): on a pool with
little headroom, the merge best on the search tasks is often the luckiest, not the best, and
loses to a plain checkpoint on held-out data. So CMA-ES never sees a share of each search
task's documents (recipe `selection.holdback`), and once the search is over:

1. The finalists are the `selection.finalists` best distinct merges by search objective
   (proposals, and the greedy soup's intermediate soups: the merge the search alone would
   pick is always one of them), and the mean of CMA-ES's final distribution (a
   recommendation that averages over many samples rather than picking the luckiest).
2. Every baseline and every finalist is scored on the held-back documents.
3. The reference is the baseline with the best objective over all its dev documents (search
   and held back; baselines were not chosen by the search, so their search scores are fair).
4. The challenger is the finalist best on the held-back documents.
5. The challenger wins only when its paired-bootstrap margin over the reference on the
   held-back documents stays above 0 at the one-sided level (1 − confidence) / m, with m the
   number of finalists it was picked from (Bonferroni); otherwise the reference is kept, and
   the decision says so.

With `holdback: 0` there is nothing held back, and the best merge on the search tasks wins,
as before this rule existed. `paired_bootstrap` is shared with the report, whose holdout
intervals use the same resampling.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

# recipe task -> the metric of each document, in document order.
Documents = Dict[str, Sequence[float]]

BOOTSTRAP_DRAWS = 2000
# The report and the selection must be the same every time they are rebuilt from the journal.
BOOTSTRAP_SEED = 0


def paired_bootstrap(mine: Documents, theirs: Documents, shares: Dict[str, float],
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> Optional[np.ndarray]:
    """Bootstrap draws of objective(mine) − objective(theirs), resampling documents within each task.

    Both must hold every task with a positive share, on the same documents in the same order
    (the same lm-eval task scored for two models); otherwise there is nothing to pair: None.
    """
    tasks = [task for task, share in shares.items() if share > 0]
    if not all(task in mine and task in theirs and len(mine[task]) == len(theirs[task]) > 0 for task in tasks):
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for task in tasks:
        difference = np.asarray(mine[task], dtype=float) - np.asarray(theirs[task], dtype=float)
        count = len(difference)
        for start in range(0, draws, 250):  # in blocks: draws × documents indices at once could be large
            block = min(250, draws - start)
            total[start:start + block] += shares[task] * difference[rng.integers(0, count, (block, count))].mean(axis=1)
    return total


def objective_difference(mine: Documents, theirs: Documents, shares: Dict[str, float]) -> float:
    return math.fsum(share * (float(np.mean(mine[task])) - float(np.mean(theirs[task])))
                     for task, share in shares.items() if share > 0)


@dataclass(frozen=True)
class Interval:
    """A margin (objective points as fractions, mine − theirs) and its two-sided 95% bootstrap interval."""

    margin: float
    low: Optional[float]
    high: Optional[float]

    @property
    def verdict(self) -> str:
        """better / worse / no different, as the interval supports (no interval: by the margin alone)."""
        if self.low is None:
            return "better" if self.margin > 0 else "worse" if self.margin < 0 else "no different"
        return "better" if self.low > 0 else "worse" if self.high < 0 else "no different"


def interval(mine: Documents, theirs: Documents, shares: Dict[str, float], margin: float) -> Interval:
    """`margin` with the 95% interval of the paired bootstrap over documents, where they can be paired."""
    draws = paired_bootstrap(mine, theirs, shares) if mine and theirs else None
    if draws is None:
        return Interval(margin, None, None)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(margin, float(low), float(high))


@dataclass(frozen=True)
class Contender:
    """A merge in the final choice: its name and kind, and its scores on the search and held-back documents."""

    name: str
    kind: str  # checkpoint, uniform, greedy (baselines); proposal, greedy-step, mean (finalists)
    search: Optional[float]  # search objective (None for a finalist not scored there)
    selection: float  # objective on the held-back documents
    documents: Optional[Documents]  # per-document metrics on the held-back documents


@dataclass(frozen=True)
class Decision:
    """The winner and why: what the journal's `selection` record and the report keep."""

    winner: str
    kind: str
    reference: str
    challenger: Optional[str]
    margin: Optional[float]  # challenger − reference on the held-back documents
    lower: Optional[float]  # the one-sided lower bound the rule compared with 0
    level: Optional[float]  # the one-sided level of that bound
    reason: str

    def record(self) -> dict:
        return asdict(self)


def dev_objective(contender: Contender, holdback: float) -> float:
    """A baseline's objective over all its dev documents: search and held back, by their shares."""
    if contender.search is None:
        return contender.selection
    return (1 - holdback) * contender.search + holdback * contender.selection


def choose(baselines: List[Contender], finalists: List[Contender], shares: Dict[str, float], holdback: float,
           confidence: float) -> Decision:
    """The rule of the module doc: a finalist replaces the best baseline only on a corrected paired win."""
    if not baselines and not finalists:
        raise ValueError("nothing to choose from")
    if not baselines:
        best = max(finalists, key=lambda c: c.selection)
        return Decision(best.name, best.kind, best.name, None, None, None, None,
                        "no baseline could be scored: the finalist best on the held-back documents wins")
    # Ties keep the earlier baseline, in the order checkpoints, uniform soup, greedy soup.
    reference = max(baselines, key=lambda c: (dev_objective(c, holdback), c.selection, -baselines.index(c)))
    if not finalists:
        return Decision(reference.name, reference.kind, reference.name, None, None, None, None,
                        f"no finalist could be scored: kept {reference.name}, the best baseline on the dev documents")
    challenger = max(finalists, key=lambda c: (c.selection, -finalists.index(c)))
    margin = challenger.selection - reference.selection
    level = (1 - confidence) / len(finalists)
    draws = paired_bootstrap(challenger.documents or {}, reference.documents or {}, shares)
    lower = float(np.quantile(draws, level)) if draws is not None else None
    held = f"on the held-back documents {challenger.name} scores {margin * 100:+.2f} points against {reference.name}"
    if lower is None:
        wins = margin > 0
        why = f"{held} (no per-document scores to bootstrap: compared by the objective alone)"
    else:
        wins = lower > 0
        why = (f"{held}, one-sided {1 - level:.1%} lower bound {lower * 100:+.2f} (confidence {confidence:g}, "
               f"corrected for {len(finalists)} finalists)")
    if wins:
        return Decision(challenger.name, challenger.kind, reference.name, challenger.name, margin, lower, level,
                        f"{why}: {challenger.name} wins")
    return Decision(reference.name, reference.kind, reference.name, challenger.name, margin, lower, level,
                    f"{why}: not a clear win, so {reference.name}, the best baseline on the dev documents, is kept")
