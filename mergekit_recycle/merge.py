"""Running a mergekit YAML with recycle_linear available: prepare, then hand to mergekit.

Preparation is what mergekit-yaml would not do for us: refuse recycle_linear settings
that cannot merge before any tensor is read, drop zero-weight models so that their
files are never opened, and make local model paths absolute so that mergekit's model
card does not ask the Hub about them.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mergekit.config import MergeConfiguration
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


def _inputs(config: MergeConfiguration) -> List[Tuple[str, Any]]:
    """(location, input definition) for every model entry of the configuration."""
    found = [(f"models[{i}]", m) for i, m in enumerate(config.models or [])]
    for i, output_slice in enumerate(config.slices or []):
        found += [(f"slices[{i}].sources[{j}]", s) for j, s in enumerate(output_slice.sources)]
    for name, module in (config.modules or {}).items():
        found += [(f"modules.{name}.models[{i}]", m) for i, m in enumerate(module.models or [])]
        for i, output_slice in enumerate(module.slices or []):
            found += [
                (f"modules.{name}.slices[{i}].sources[{j}]", s) for j, s in enumerate(output_slice.sources)
            ]
    return found


def _weight_setting(config: MergeConfiguration, entry: Any) -> Any:
    for parameters in (entry.parameters, config.parameters):
        if parameters and "weight" in parameters:
            return parameters["weight"]
    return None


def check_recycle_linear(config: MergeConfiguration, path: Path) -> None:
    """Refuse negative, missing or all-zero weights and a scale without an anchor.

    Weights given as gradients or filtered lists vary per tensor; the kernel checks those.
    """
    entries = _inputs(config)
    weights: Dict[int, Optional[float]] = {}
    varying = False
    for index, (_, entry) in enumerate(entries):
        setting = _weight_setting(config, entry)
        if setting is not None and _scalar(setting) is None:
            varying = True
        else:
            weights[index] = _scalar(setting)
    if varying:  # a varying weight may be the positive one
        weights[-1] = 1.0
    anchor = next((i for i, (_, e) in enumerate(entries) if e.model == config.base_model), None)
    scale = _scalar((config.parameters or {}).get("scale", 1.0))
    try:
        check_weights(weights, 1.0 if scale is None else scale, config.base_model is not None, anchor)
    except RecycleLinearError as exc:
        if exc.model is None:
            where = "parameters.scale" if "scale" in exc.reason else "models"
            raise MergeConfigError(path, where, exc.reason) from None
        location, entry = entries[int(exc.model)]
        raise MergeConfigError(path, f"{location}.parameters.weight", f"model {entry.model}: {exc.reason}") from None


def drop_zero_weight_models(config: MergeConfiguration) -> MergeConfiguration:
    """Remove inputs whose weight is exactly 0 (never the base model), so none of their tensors is read."""

    def keep(entry: Any) -> bool:
        return entry.model == config.base_model or _scalar(_weight_setting(config, entry)) != 0.0

    update: Dict[str, Any] = {}
    if config.models:
        update["models"] = [m for m in config.models if keep(m)]
    if config.slices:
        update["slices"] = [
            s.model_copy(update={"sources": [src for src in s.sources if keep(src)]}) for s in config.slices
        ]
    if config.modules:
        update["modules"] = {
            name: module.model_copy(
                update={
                    "models": [m for m in module.models if keep(m)] if module.models else module.models,
                    "slices": [
                        s.model_copy(update={"sources": [src for src in s.sources if keep(src)]})
                        for s in module.slices
                    ]
                    if module.slices
                    else module.slices,
                }
            )
            for name, module in config.modules.items()
        }
    return config.model_copy(update=update)


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
