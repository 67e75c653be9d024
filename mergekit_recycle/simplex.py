"""Weights on the simplex: non-negative numbers rescaled to sum to 1."""

import math
from typing import List, Sequence


def normalise(weights: Sequence[float]) -> List[float]:
    """Rescale non-negative weights to sum to 1, without overflow or underflow.

    Dividing by the largest weight first keeps the sum finite for weights near the
    float limits (1e308) and non-zero for subnormal ones (1e-320).
    """
    largest = max(weights, default=0.0)
    if not largest > 0.0 or not math.isfinite(largest):
        raise ValueError(f"weights must be finite, >= 0, and not all 0: {list(weights)}")
    scaled = [w / largest for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]
