"""The `recycle_linear` merge method: θ = θ_anchor + scale · Σ wᵢ (θᵢ − θ_anchor), Σw = 1.

Without an anchor (`base_model`) and with scale 1 this is the weighted average of
Khalifa et al. 2024 ("If You Can't Use Them, Recycle Them"). With an anchor, scale > 1
extrapolates along the direction in which the pool moved away from the anchor.

The anchor may carry a weight of its own when it is also a member of the pool; when it
carries none it counts as weight 0 (it then only anchors the extrapolation). Inputs
with weight 0 contribute nothing, and `prepare_merge_config` drops them before
mergekit plans the merge, so their tensors are never read.
"""

import math
from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerInput, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import RecycleLinearError
from mergekit_recycle.simplex import normalise


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs stay float64; everything else is summed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_weight(weight: float, model: str, tensor: Optional[str] = None) -> float:
    """One input's weight: a finite number >= 0."""
    weight = float(weight)
    if not (math.isfinite(weight) and weight >= 0.0):
        raise RecycleLinearError(f"weight must be a finite number >= 0, got {weight}", "weight", model=model, tensor=tensor)
    return weight


def check_total(weights: Sequence[float], tensor: Optional[str] = None) -> None:
    if weights and not any(w > 0.0 for w in weights):
        raise RecycleLinearError("all weights are zero; give at least one model a positive weight", "weight", tensor=tensor)


def check_scale(scale: float, has_anchor: bool, tensor: Optional[str] = None) -> float:
    """The extrapolation scale: finite, and other than 1 only with an anchor."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise RecycleLinearError(f"scale must be a finite number, got {scale}", "scale", tensor=tensor)
    if not has_anchor and scale != 1.0:
        raise RecycleLinearError(f"scale={scale} needs a base_model (the anchor to extrapolate from)", "scale", tensor=tensor)
    return scale


@merge_method(
    name=RECYCLE_LINEAR,
    pretty_name="Recycle Linear",
    reference_url="https://arxiv.org/abs/2412.04144",
    contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
)
def recycle_linear(
    group: TensorGroup,
    weight: PerInput[Optional[float]] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    base = group.base
    tensor = group.metadata.name
    scale = check_scale(scale, has_anchor=base is not None, tensor=tensor)
    weights = []
    for entry in group.entries:
        value = weight[entry.id]
        if value is None and not entry.is_base:
            raise RecycleLinearError("no weight given", "weight", model=str(entry.id), tensor=tensor)
        # The anchor without a weight of its own only anchors the extrapolation.
        weights.append(0.0 if value is None else check_weight(value, str(entry.id), tensor))
    check_total(weights, tensor)

    first = group.entries[0].tensor
    dtype = accumulation_dtype(first.dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for entry, coefficient in zip(group.entries, normalise(weights)):
        if coefficient != 0.0:
            result.add_(entry.tensor.to(dtype), alpha=coefficient)
    if base is not None and scale != 1.0:
        # θ_a + s·(avg − θ_a) = s·avg + (1 − s)·θ_a
        result.mul_(scale).add_(base.tensor.to(dtype), alpha=1.0 - scale)
    return result.to(first.dtype)


def register_method() -> None:
    """Make `recycle_linear` known to mergekit by name (idempotent): mergekit-yaml, run_merge and
    merge_state_dicts look merge methods up in its registry."""
    from mergekit.merge_methods import registry

    if RECYCLE_LINEAR not in {method.spec.name for method in registry.registered_methods()}:
        registry.register(recycle_linear)


# Whoever imports the method, mergekit knows it (plugin.py imports this module for mergekit-yaml).
register_method()
