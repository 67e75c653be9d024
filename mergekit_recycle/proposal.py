"""Proposals: points of the search space, and the merges they stand for.

CMA-ES searches an unconstrained space of coordinates x. A point maps to a merge by

    wᵢ = |xᵢ| / Σⱼ |xⱼ|                      (one coordinate per pool checkpoint)
    scale = lo + (hi − lo) · fold(x_scale)   (only when `search.scale` is a range)

where fold(t) reflects t into [0, 1] (… 1.2 → 0.8, −0.3 → 0.3 …). Every point of the
simplex is its own coordinate (w = |w| / Σ|w| when Σw = 1), so a known merge (a
baseline) can be injected into CMA-ES exactly, and the folds keep the map continuous,
without the flat regions that clipping would create. A point with every weight 0 (a
set of measure zero) maps to the uniform soup.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, field_validator

from mergekit_recycle.simplex import normalise

# Weights that differ by less than this are the same merge: no proposal is evaluated twice.
SAME_MERGE_DIGITS = 9


class Merge(BaseModel):
    """A linear merge of the pool: normalised weights per checkpoint, and recycle_linear's scale."""

    model_config = ConfigDict(frozen=True)

    weights: Dict[str, float]
    scale: float = 1.0

    @field_validator("weights")
    @classmethod
    def _normalised(cls, weights: Dict[str, float]) -> Dict[str, float]:
        return dict(zip(weights, normalise(list(weights.values()))))

    @classmethod
    def of(cls, names: Sequence[str], chosen: Sequence[str] = (), scale: float = 1.0) -> "Merge":
        """The soup of `chosen` (all of `names` when empty) with equal weights."""
        chosen = set(chosen or names)
        return cls(weights={name: float(name in chosen) for name in names}, scale=scale)

    @property
    def key(self) -> Tuple[float, ...]:
        """What makes two merges the same merge."""
        return tuple(round(self.weights[name], SAME_MERGE_DIGITS) for name in sorted(self.weights)) + (
            round(self.scale, SAME_MERGE_DIGITS),
        )

    def nonzero(self, threshold: float = 0.0) -> List[str]:
        return [name for name, weight in self.weights.items() if weight > threshold]


def _fold(t: float) -> float:
    t = math.fmod(abs(t), 2.0)
    return 2.0 - t if t > 1.0 else t


class SearchSpace:
    """The coordinates CMA-ES searches, and the map from them to merges (see the module doc)."""

    def __init__(self, names: Sequence[str], scale: float = 1.0, scale_range: Optional[Tuple[float, float]] = None):
        self.names = list(names)
        self.scale = scale
        self.scale_range = scale_range

    @property
    def dimension(self) -> int:
        return len(self.names) + (1 if self.scale_range else 0)

    def merge(self, coordinates: Sequence[float]) -> Merge:
        weights = [abs(float(x)) for x in coordinates[: len(self.names)]]
        if not any(w > 0 for w in weights) or not all(math.isfinite(w) for w in weights):
            weights = [1.0] * len(self.names)
        scale = self.scale
        if self.scale_range:
            lo, hi = self.scale_range
            scale = lo + (hi - lo) * _fold(float(coordinates[-1]))
        return Merge(weights=dict(zip(self.names, weights)), scale=scale)

    def coordinates(self, merge: Merge) -> List[float]:
        """The point that maps to `merge` (its scale clipped into the searched range)."""
        point = [merge.weights[name] for name in self.names]
        if self.scale_range:
            lo, hi = self.scale_range
            point.append(min(max((merge.scale - lo) / (hi - lo), 0.0), 1.0))
        return point

    def start_scale(self) -> float:
        """Where the search starts along `scale`: 1 (the plain weighted average) when the range holds it."""
        if not self.scale_range:
            return self.scale
        lo, hi = self.scale_range
        return 1.0 if lo <= 1.0 <= hi else (lo + hi) / 2
