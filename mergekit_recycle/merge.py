"""Running a mergekit YAML with recycle_linear available: prepare, then hand to mergekit.

Preparation is what mergekit-yaml would not do for us: refuse recycle_linear settings
that cannot merge before any tensor is read, drop zero-weight models so that their
files are never opened, and make local model paths absolute so that mergekit's model
card does not ask the Hub about them.
"""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registry
from mergekit.options import MergeOptions

from mergekit_recycle.config_files import read_yaml, validate_model
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import MergeConfigError, RecycleLinearError
from mergekit_recycle.recycle_linear import check_weights


def load_merge_config(path: Path) -> Tuple[MergeConfiguration, str]:
    """Read a mergekit YAML; return the configuration and its source text."""
    if not path.is_file():
        raise MergeConfigError(path, "", "file not found")
    data = read_yaml(path, MergeConfigError)
    config = validate_model(MergeConfiguration, data, path, MergeConfigError)
    known = sorted(method.spec.name for method in registry.registered_methods())
    if config.merge_method not in known:
        raise MergeConfigError(path, "merge_method", f"unknown merge method {config.merge_method!r}; known: {', '.join(known)}")
    return config, path.read_text(encoding="utf-8")


def _scalar(setting: Any) -> Optional[float]:
    """A parameter setting as one number, or None when it is a gradient or filter list."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    return None


def _weight(config: MergeConfiguration, entry: InputModelDefinition) -> Any:
    """The weight setting that applies to a `models:` entry (its own, else the global one)."""
    for parameters in (entry.parameters, config.parameters):
        if parameters and "weight" in parameters:
            return parameters["weight"]
    return None


def check_recycle_linear(config: MergeConfiguration, path: Path) -> None:
    """Refuse negative, missing or all-zero weights and a scale without an anchor.

    Covers the `models:` form, where every weight applies to every tensor. Weights that
    vary per tensor (gradients, filters, the `slices:` and `modules:` forms) are checked
    by the kernel as it merges each tensor.
    """
    entries = config.models or []
    weights: Dict[int, Optional[float]] = {}
    varies = False
    for index, entry in enumerate(entries):
        setting = _weight(config, entry)
        if setting is not None and _scalar(setting) is None:
            varies = True
        else:
            weights[index] = _scalar(setting)
    if varies:  # a varying weight may be the positive one
        weights[-1] = 1.0
    anchor = next((i for i, entry in enumerate(entries) if entry.model == config.base_model), None)
    scale = _scalar((config.parameters or {}).get("scale", 1.0))
    try:
        check_weights(weights, 1.0 if scale is None else scale, config.base_model is not None, anchor)
    except RecycleLinearError as exc:
        if exc.model is None:
            where = "parameters.scale" if exc.parameter == "scale" else "models"
            raise MergeConfigError(path, where, exc.reason) from None
        index = int(exc.model)
        raise MergeConfigError(
            path, f"models[{index}].parameters.weight", f"model {entries[index].model}: {exc.reason}"
        ) from None


def drop_zero_weight_models(config: MergeConfiguration) -> MergeConfiguration:
    """Remove `models:` entries whose weight is exactly 0 (never the anchor), so none of their tensors is read."""
    if not config.models:
        return config
    kept = [m for m in config.models if m.model == config.base_model or _scalar(_weight(config, m)) != 0.0]
    return config.model_copy(update={"models": kept})


def absolute_local_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Rewrite model paths that exist on disk as absolute paths; leave Hub ids alone."""

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and value and os.path.isdir(value.split("@")[0].split("+")[0]):
            head, sep, rest = value.partition("+")
            return os.path.abspath(head) + sep + (os.path.abspath(rest) if rest and os.path.isdir(rest) else rest)
        return value

    data = config.model_dump(exclude_none=True, mode="json")
    for key in ("models", "slices", "modules", "base_model", "tokenizer_source"):
        if key in data:
            data[key] = fix(data[key])
    if isinstance(data.get("tokenizer"), dict) and "source" in data["tokenizer"]:
        data["tokenizer"]["source"] = fix(data["tokenizer"]["source"])
    return MergeConfiguration.model_validate(data)


def prepare_merge_config(config: MergeConfiguration, path: Path) -> MergeConfiguration:
    """Everything `merge_yaml` does to a configuration before mergekit plans it."""
    if config.merge_method == RECYCLE_LINEAR:
        check_recycle_linear(config, path)
        config = drop_zero_weight_models(config)
    return absolute_local_paths(config)


def merge_yaml(config_path: Path, out_path: Path, options: MergeOptions) -> None:
    """Merge what a mergekit YAML describes into `out_path`, as mergekit-yaml would."""
    config, source = load_merge_config(config_path)
    config = prepare_merge_config(config, config_path)
    run_merge(config, str(out_path), options=options, config_source=source)
