"""Running a mergekit YAML with recycle_linear available: prepare, then hand to mergekit.

Preparation is what mergekit-yaml would not do for us: refuse recycle_linear settings
that cannot merge before any tensor is read, drop zero-weight models so that their
files are never opened, resolve local model paths (refusing missing ones, making
the others absolute so that mergekit's model card does not ask the Hub about them), and
fetch Hub references as the pool does, including `hf://repo@sha/subfolder` ones.
Then the tokenizer comes from a donor chosen by a fixed rule (`tokenizer_order`, `has_tokenizer`:
the search's rule, zero-weight models included), where mergekit would take the first of a set of
models, an order that follows PYTHONHASHSEED.
"""

import functools
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import pydantic
from mergekit.card import generate_card
from mergekit.common import ModelPath, ModelReference
from mergekit.config import ConditionalParameter, InputModelDefinition, MergeConfiguration
from mergekit.merge import _copy_tokenizer, run_merge
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ParameterSpec
from mergekit.options import MergeOptions
from pydantic import BaseModel

from mergekit_recycle.config_files import read_yaml, validate_model
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import (MergeConfigError, MergeConfigFileNotFoundError, RecycleLinearError, one_line,
                                     shorten)
from mergekit_recycle.plugin import register
from mergekit_recycle.recycle_linear import check_scale, check_total, check_weight

# The parameters recycle_linear takes, where a mergekit YAML may set them.
GLOBAL_PARAMETERS = ("weight", "scale")
MODEL_PARAMETERS = ("weight",)


def load_merge_config(path: Path) -> Tuple[MergeConfiguration, str]:
    """Read a mergekit YAML; return the configuration and its source text."""
    register()  # whatever the caller imported first, mergekit knows recycle_linear from here on
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


def check_numbers(setting: Any, location: str, path: Path) -> None:
    """A weight or scale is a number, a gradient (a list of them) or filtered values of those.

    mergekit reads the string "0.5" as 0.5 and fails on "abc" only while merging; a recipe refuses
    strings, and so does this, for the same YAML value."""
    if isinstance(setting, ConditionalParameter):
        check_numbers(setting.value, f"{location}.value", path)
    elif isinstance(setting, list):
        for index, value in enumerate(setting):
            check_numbers(value, f"{location}[{index}]", path)
    elif isinstance(setting, bool) or not isinstance(setting, (int, float)):
        raise MergeConfigError(path, location, f"{shorten(repr(setting))} is not a number; write a number without "
                               "quotes, e.g. 0.5")


def check_recycle_linear(config: MergeConfiguration, path: Path) -> None:
    """Refuse values that are not numbers, unknown parameters, negative, missing or all-zero weights,
    and a scale without an anchor.

    Covers the `models:` form, where a number applies to every tensor. Settings that vary
    per tensor (gradients, filters, the `slices:` and `modules:` forms) are checked by
    the kernel as it merges each tensor.
    """
    for location, parameters, allowed in [("parameters", config.parameters, GLOBAL_PARAMETERS)] + [
        (f"models[{i}].parameters", m.parameters, MODEL_PARAMETERS) for i, m in enumerate(config.models or [])
    ]:
        for name, setting in (parameters or {}).items():
            if name not in allowed:
                raise MergeConfigError(path, f"{location}.{shorten(name)}", f"recycle_linear takes no parameter "
                                       f"{shorten(repr(name))} here (it takes: {', '.join(allowed)})")
            check_numbers(setting, f"{location}.{name}", path)

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


# Files of which one makes a folder's tokenizer loadable (mergekit copies tokenizer.json or
# tokenizer.model with tokenizer_config.json, and has transformers read and save the others).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder has tokenizer files: the one test of both the search's tokenizer
    (resident_merge.load_resident_model) and the merge's donor, so that the merged model gets
    the tokenizer that was scored."""
    return any(path.is_file() for pattern in TOKENIZER_FILES for path in folder.glob(pattern))


def tokenizer_order(config: MergeConfiguration) -> List[ModelReference]:
    """The models the tokenizer donor is looked for in. For recycle_linear the README's rule, the one
    the search uses: the models in order, then the anchor. For other methods mergekit's own:
    base_model first."""
    models = [entry.model for entry in config.models or []]
    models += [source.model for output in config.slices or [] for source in output.sources]
    base = [config.base_model] if config.base_model is not None else []
    return models + base if config.merge_method == RECYCLE_LINEAR else base + models


def _local_reference(reference: ModelReference) -> Optional[ModelReference]:
    """A reference to an existing local folder, made absolute; None otherwise (the Hub reference of a
    dropped model is never fetched, so its tokenizer is not looked at)."""
    local = os.path.expanduser(reference.model.path)
    if not os.path.isdir(local):
        return None
    return reference.model_copy(update={"model": reference.model.model_copy(update={"path": os.path.abspath(local)})})


def prepare_merge_config(config: MergeConfiguration, path: Path,
                         trust_remote_code: bool = False) -> Tuple[MergeConfiguration, Optional[ModelReference]]:
    """Everything `merge_yaml` does to a configuration before mergekit plans it; and the tokenizer donor:
    the first model in `tokenizer_order` whose folder has tokenizer files, None when none has.

    The donor is chosen among all models, zero-weight ones included, as the search chooses its
    tokenizer whatever the weights: a baseline (one checkpoint, weight 0 elsewhere) gets the
    tokenizer it was scored with. A LoRA-adapted model's tokenizer is left to mergekit."""
    order = tokenizer_order(config)
    kept = config
    if config.merge_method == RECYCLE_LINEAR:
        check_recycle_linear(config, path)
        kept = drop_zero_weight_models(config)
    resolved = resolve_paths(kept, path, trust_remote_code)
    # Resolving maps each reference to one, in place: the same order, now absolute or fetched.
    mapping = dict(zip(tokenizer_order(kept), tokenizer_order(resolved)))
    candidates = (mapping[m] if m in mapping else _local_reference(m) for m in order)
    donor = next((m for m in candidates if m is not None and m.lora is None and has_tokenizer(Path(m.model.path))),
                 None)
    return resolved, donor


def _refused_parameter(exc: pydantic.ValidationError) -> Optional[str]:
    """The name of the merge parameter whose value mergekit refused, when `exc` comes from checking one
    (`ParameterSpec.validate`, mergekit 0.1.x: its errors have no location); None for any other error."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code is ParameterSpec.validate.__code__:
            return str(frame.tb_frame.f_locals["self"].name)
        frame = frame.tb_next
    return None


def merge_yaml(config_path: Path, out_path: Path, options: MergeOptions, name: Optional[str] = None) -> None:
    """Merge what a mergekit YAML describes into `out_path`, as mergekit-yaml would, with the tokenizer
    of the donor `prepare_merge_config` chose. `name` titles the model card (mergekit's title is `out_path`'s folder name,
    wrong for a folder that is renamed afterwards)."""
    config, source = load_merge_config(config_path)
    config, donor = prepare_merge_config(config, config_path, options.trust_remote_code)
    # With tokenizer_source (or tokenizer:) mergekit builds the tokenizer itself; otherwise it copies
    # one, from the donor chosen by rule instead.
    if not options.copy_tokenizer or config.tokenizer_source is not None or config.tokenizer is not None:
        donor = None
    elif donor is None and not any(m.lora for m in config.referenced_models()):
        raise MergeConfigError(config_path, "models" if config.models else "slices", "no model folder has a "
                               f"tokenizer ({', '.join(TOKENIZER_FILES)}); add one to a model's folder, or merge "
                               "with --no-copy-tokenizer")
    try:
        run_merge(config, str(out_path), options=options.model_copy(update={"copy_tokenizer": donor is None and
                                                                             options.copy_tokenizer}),
                  config_source=source)
    except pydantic.ValidationError as exc:
        # A parameter's value, checked by the merge method as it merges (other methods than ours);
        # any other validation error is mergekit's own and stays as it is.
        parameter = _refused_parameter(exc)
        if parameter is None:
            raise
        first = exc.errors(include_url=False)[0]
        raise MergeConfigError(config_path, "parameters", f"merge parameter {shorten(repr(parameter))} has a value "
                               f"{config.merge_method} cannot use: {first['msg']} (got "
                               f"{shorten(repr(first.get('input')))})") from None
    if donor is not None:
        try:
            # _copy_tokenizer is mergekit's private API (0.1.x, hence the <0.2 bound in pyproject.toml).
            _copy_tokenizer(config.model_copy(update={"base_model": donor}), str(out_path), options)
        except (OSError, ValueError) as exc:
            raise MergeConfigError(config_path, "models", f"model {donor.model.path}: its tokenizer cannot be copied "
                                   f"({one_line(exc, 200)}); fix its tokenizer files, or merge "
                                   "with --no-copy-tokenizer") from None
    if name is not None and options.write_model_card:
        (out_path / "README.md").write_text(generate_card(config=config, config_yaml=source, name=name),
                                            encoding="utf-8")
