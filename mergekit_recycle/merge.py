"""Running a mergekit YAML with recycle_linear available: prepare, then hand to mergekit.

Preparation is what mergekit-yaml would not do for us: refuse recycle_linear settings
that cannot merge before any tensor is read, drop zero-weight models so that their
files are never opened, resolve local model paths (refusing missing ones, making
the others absolute so that mergekit's model card does not ask the Hub about them), and
fetch Hub references as the pool does, including `hf://repo@sha/subfolder` ones.
"""

import functools
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from mergekit.common import ModelPath, ModelReference
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registry
from mergekit.options import MergeOptions
from pydantic import BaseModel

from mergekit_recycle.config_files import read_yaml, validate_model
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import MergeConfigError, MergeConfigFileNotFoundError, RecycleLinearError
from mergekit_recycle.recycle_linear import check_scale, check_total, check_weight

# The parameters recycle_linear takes, where a mergekit YAML may set them.
GLOBAL_PARAMETERS = ("weight", "scale")
MODEL_PARAMETERS = ("weight",)


def load_merge_config(path: Path) -> Tuple[MergeConfiguration, str]:
    """Read a mergekit YAML; return the configuration and its source text."""
    data = read_yaml(path, MergeConfigError, MergeConfigFileNotFoundError)
    config = validate_model(MergeConfiguration, data, path, MergeConfigError)
    known = sorted(method.spec.name for method in registry.registered_methods())
    if config.merge_method not in known:
        raise MergeConfigError(path, "merge_method", f"unknown merge method {config.merge_method!r}; known: {', '.join(known)}")
    return config, path.read_text(encoding="utf-8")


def _scalar(setting: Any) -> Optional[float]:
    """A parameter setting as one number, or None when it varies per tensor (gradient, filters)."""
    if isinstance(setting, (int, float)):
        return float(setting)
    return None


def _weight(config: MergeConfiguration, entry: InputModelDefinition) -> Any:
    """The weight setting that applies to a `models:` entry (its own, else the global one)."""
    for parameters in (entry.parameters, config.parameters):
        if parameters and "weight" in parameters:
            return parameters["weight"]
    return None


def check_recycle_linear(config: MergeConfiguration, path: Path) -> None:
    """Refuse unknown parameters, negative, missing or all-zero weights, and a scale without an anchor.

    Covers the `models:` form, where a number applies to every tensor. Settings that vary
    per tensor (gradients, filters, the `slices:` and `modules:` forms) are checked by
    the kernel as it merges each tensor.
    """
    for location, parameters, allowed in [("parameters", config.parameters, GLOBAL_PARAMETERS)] + [
        (f"models[{i}].parameters", m.parameters, MODEL_PARAMETERS) for i, m in enumerate(config.models or [])
    ]:
        for name in parameters or {}:
            if name not in allowed:
                raise MergeConfigError(path, f"{location}.{name}", f"recycle_linear takes no parameter {name!r} here (it takes: {', '.join(allowed)})")

    def refuse(location: str, check: Callable[[], Any], model: Any = None) -> Any:
        try:
            return check()
        except RecycleLinearError as exc:
            prefix = f"model {model}: " if model is not None else ""
            raise MergeConfigError(path, location, prefix + exc.reason) from None

    scale = _scalar((config.parameters or {}).get("scale", 1.0))
    if scale is not None:
        refuse("parameters.scale", lambda: check_scale(scale, has_anchor=config.base_model is not None))

    weights: List[float] = []
    varies = False
    for index, entry in enumerate(config.models or []):
        location, setting = f"models[{index}].parameters.weight", _weight(config, entry)
        if setting is None and entry.model != config.base_model:
            raise MergeConfigError(path, location, f"model {entry.model}: no weight given")
        value = _scalar(setting)
        varies = varies or (setting is not None and value is None)
        if value is not None:
            weights.append(refuse(location, lambda: check_weight(value, str(entry.model)), entry.model))
    if not varies:
        refuse("models", lambda: check_total(weights))


def drop_zero_weight_models(config: MergeConfiguration) -> MergeConfiguration:
    """Remove `models:` entries whose weight is exactly 0 (never the anchor), so none of their tensors is read."""
    if not config.models:
        return config
    kept = [m for m in config.models if m.model == config.base_model or _scalar(_weight(config, m)) != 0.0]
    return config.model_copy(update={"models": kept})


def _looks_local(path: str) -> bool:
    """mergekit's rule: these can only be local paths, never Hub repo ids."""
    return path.startswith(("/", "~", ".")) or path.count("/") > 1


def _resolve_path(model_path: ModelPath, location: str, config_file: Path, fetch: Optional[Callable] = None) -> ModelPath:
    """A local path made absolute; a Hub reference fetched by `fetch` (None: left to mergekit)."""
    if model_path.path.startswith(HF_URL):
        if fetch is None:
            raise MergeConfigError(config_file, location, f"{HF_URL} references name checkpoints, not adapters")
        return fetch(model_path, location, config_file)
    local = os.path.expanduser(model_path.path)
    if os.path.isdir(local):
        return model_path.model_copy(update={"path": os.path.abspath(local)})
    if os.path.exists(local):
        raise MergeConfigError(config_file, location, f"not a model directory: {os.path.abspath(local)}")
    if _looks_local(model_path.path):
        raise MergeConfigError(config_file, location, f"no such model directory: {os.path.abspath(local)}")
    return fetch(model_path, location, config_file) if fetch else model_path


HF_URL = "hf://"


def _from_hub(model_path: ModelPath, location: str, config_file: Path, trust_remote_code: bool = False) -> ModelPath:
    """A model's Hub reference fetched as the pool fetches checkpoints: safetensors only, into the HF
    cache (offline from it). `repo[@revision]`, or `hf://repo@revision/subfolder` for a checkpoint
    folder inside a repo, which plain mergekit cannot read; in that form the revision has no `/`."""
    from mergekit_recycle.hub_pool import fetch_reference

    if model_path.path.startswith(HF_URL):
        # mergekit split `hf://repo@revision/subfolder` at the `@`: the subfolder sits in the revision.
        parts = model_path.path[len(HF_URL):].split("/")
        repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
        revision = model_path.revision
        if revision and "/" in revision:
            revision, subfolder = revision.split("/", 1)
    else:
        repo, revision, subfolder = model_path.path, model_path.revision, ""
    checkpoint = fetch_reference(repo, revision or "main", subfolder or None, config_file, location, trust_remote_code)
    return ModelPath(path=str(checkpoint.path))


def _map_references(value: Any, location: str, change: Callable[[ModelReference, str], ModelReference]) -> Any:
    """Apply `change` to every ModelReference inside a configuration, and to nothing else."""
    if isinstance(value, ModelReference):
        return change(value, location)
    if isinstance(value, BaseModel):
        return value.model_copy(
            update={
                name: _map_references(getattr(value, name), f"{location}.{name}" if location else name, change)
                for name in type(value).model_fields
            }
        )
    if isinstance(value, list):
        return [_map_references(v, f"{location}[{i}]", change) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _map_references(v, f"{location}.{k}", change) for k, v in value.items()}
    return value


def resolve_paths(config: MergeConfiguration, config_file: Path, trust_remote_code: bool = False) -> MergeConfiguration:
    """Make local model (and LoRA) paths absolute, refusing ones that do not exist, and fetch the
    models' Hub references (a LoRA adapter on the Hub is left to mergekit, which merges it)."""
    fetch = functools.partial(_from_hub, trust_remote_code=trust_remote_code)

    def resolve(reference: ModelReference, location: str) -> ModelReference:
        return reference.model_copy(
            update={
                "model": _resolve_path(reference.model, location, config_file, fetch),
                "lora": reference.lora and _resolve_path(reference.lora, location, config_file),
            }
        )

    return _map_references(config, "", resolve)


def prepare_merge_config(config: MergeConfiguration, path: Path, trust_remote_code: bool = False) -> MergeConfiguration:
    """Everything `merge_yaml` does to a configuration before mergekit plans it."""
    if config.merge_method == RECYCLE_LINEAR:
        check_recycle_linear(config, path)
        config = drop_zero_weight_models(config)
    return resolve_paths(config, path, trust_remote_code)


def merge_yaml(config_path: Path, out_path: Path, options: MergeOptions) -> None:
    """Merge what a mergekit YAML describes into `out_path`, as mergekit-yaml would."""
    config, source = load_merge_config(config_path)
    config = prepare_merge_config(config, config_path, options.trust_remote_code)
    run_merge(config, str(out_path), options=options, config_source=source)
