"""The pool: recipe entries resolved to checkpoint folders, checked to be mergeable.

Resolution turns each recipe entry into one or more `Checkpoint`s with a readable name
and a pinned source. Local folders resolve to themselves; Hub entries are resolved,
pinned to commit SHAs and downloaded by hub_pool.py, into the same kind of `Checkpoint`
(a folder on disk), so nothing downstream knows where a checkpoint came from. The types
(`Checkpoint`, `Pool`, `TensorLayout`) are in checkpoints.py, which hub_pool.py builds on too.

Before anything is evaluated, every checkpoint is checked against the first: an architecture
of the tested matrix (architecture.py), the same tensor names and the same shapes, read from
config.json and the safetensors headers (no tensor is loaded). Tensors the model does not load
(buffers transformers recomputes, such as old GPT-NeoX files' attention masks) are left out of
the comparison and of every merge; a model parameter that no tensor would write is refused.
"""

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from safetensors import safe_open

from mergekit_recycle.architecture import TensorMap, config_problem, read_architecture, tensor_map, unsupported_reason
from mergekit_recycle.checkpoints import Checkpoint, Pool, TensorLayout, tensor_bytes
from mergekit_recycle.errors import PoolError, one_line
from mergekit_recycle.hub_pool import HubResolver
from mergekit_recycle.recipe import HubCheckpoints, LocalCheckpoint, PoolEntry, Recipe


Resolver = Callable[[PoolEntry, str, Path], List[Checkpoint]]


def resolve_local(entry: LocalCheckpoint, location: str, source: Path) -> List[Checkpoint]:
    return [Checkpoint(name=entry.path.name, path=entry.path, location=location, source=str(entry.path),
                       allow_pickle=entry.allow_pickle)]


def _unique_names(checkpoints: List[Checkpoint]) -> List[Checkpoint]:
    """Folder names are the readable names; where two clash, their parent folders tell them apart.
    (Hub names, repo@revision[/subfolder], are unique already.)"""
    counts: Dict[str, int] = {}
    for checkpoint in checkpoints:
        counts[checkpoint.name] = counts.get(checkpoint.name, 0) + 1
    renamed = []
    for index, checkpoint in enumerate(checkpoints):
        name = checkpoint.name
        if counts[name] > 1:
            name = f"{checkpoint.path.parent.name}/{name}" if checkpoint.path.parent.name else f"{name}-{index}"
        renamed.append(checkpoint.model_copy(update={"name": name}))
    names = [c.name for c in renamed]
    return [c if names.count(c.name) == 1 else c.model_copy(update={"name": f"{c.name}#{i}"}) for i, c in enumerate(renamed)]


def _read_layout(checkpoint: Checkpoint, source: Path) -> TensorLayout:
    def refuse(message: str, tensor: Optional[str] = None) -> PoolError:
        return PoolError(source, checkpoint.location, str(checkpoint.path), message, tensor=tensor)

    try:
        architecture = read_architecture(checkpoint.path)
    except (OSError, ValueError) as exc:
        raise refuse(config_problem(exc)) from None
    first = next((name for name in WEIGHT_FILES if (checkpoint.path / name).is_file()), None)
    if first is None:
        raise refuse(f"no model weights found (none of {', '.join(WEIGHT_FILES)})")
    try:
        index = ShardedTensorIndex.from_disk(str(checkpoint.path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, an index KeyError
        raise refuse(_unreadable(first, exc)) from None
    if not index.is_safetensors and not checkpoint.allow_pickle:
        raise refuse("has only pickle weights (pytorch_model.bin), which can run code when loaded; convert them "
                     "to safetensors, or set `allow_pickle: true` on its entry if you trust them")
    shapes, dtypes, nbytes = {}, {}, 0
    for shard in index.shards:
        try:
            for key, shape, dtype in _tensor_headers(checkpoint.path / shard.filename, index.is_safetensors):
                shapes[key], dtypes[key] = shape, dtype
                nbytes += tensor_bytes(shape, dtype)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise refuse(_unreadable(shard.filename, exc)) from None
    return TensorLayout(architecture=architecture, shapes=shapes, dtypes=dtypes, nbytes=nbytes)


# What mergekit's ShardedTensorIndex reads first, in its order of preference.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _unreadable(filename: str, exc: Exception) -> str:
    """Why a weights file cannot be used (a truncated or overwritten safetensors file, a bad shard index)."""
    return (f"cannot read {filename} ({type(exc).__name__}: {one_line(exc, 160)}); the file is damaged or incomplete: "
            "copy or download it again")


def _tensor_headers(path: Path, is_safetensors: bool) -> Iterator[Tuple[str, Tuple[int, ...], str]]:
    """(name, shape, safetensors dtype) of every tensor in a shard, without loading the tensors."""
    if is_safetensors:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                sliced = handle.get_slice(key)
                yield key, tuple(sliced.get_shape()), sliced.get_dtype()
        return
    import torch

    # weights_only: the allowed pickle is still read with torch's restricted unpickler; mmap: no tensor is read.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a pickle from before torch's zip format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key, tensor in state.items():
        yield key, tuple(tensor.shape), _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype))


def _safetensors_dtypes() -> Dict[Any, str]:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


_SAFETENSORS_DTYPES = _safetensors_dtypes()


def model_skeleton(checkpoint: Checkpoint, trust_remote_code: bool = False):
    """The model transformers builds from a checkpoint's config.json, on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _skeleton_for(checkpoint: Checkpoint, source: Path, trust_remote_code: bool, skeletons: Dict[bytes, Any]):
    """The checkpoint's model skeleton, built once per distinct config.json (a pool's are mostly the same)."""
    key = _config_key(checkpoint)
    if key in skeletons:
        return skeletons[key]
    try:
        skeletons[key] = model_skeleton(checkpoint, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a config it cannot build
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise PoolError(source, checkpoint.location, str(checkpoint.path),
                        f"transformers cannot build a causal LM from its config.json ({type(exc).__name__}: {reason})") from None
    return skeletons[key]


def check_written(mapped: TensorMap, checkpoint: Checkpoint, source: Path) -> TensorMap:
    """`mapped`, when every model parameter is written by a tensor; else PoolError naming the parameters."""
    refusal = mapped.refusal()
    if refusal is not None:
        raise PoolError(source, checkpoint.location, str(checkpoint.path), refusal, tensor=mapped.unwritten[0])
    return mapped


def check_compatible(checkpoints: List[Checkpoint], source: Path, trust_remote_code: bool = False,
                     allow_untested: bool = False) -> TensorLayout:
    """The layout every checkpoint shares (of the tensors the model loads); PoolError naming the checkpoint
    at fault: one whose files cannot be read, whose tensors do not fit its own config.json, a parameter no
    tensor writes, or one unlike the others (the odd one out where most agree, else the later one)."""
    full = [_read_layout(checkpoint, source) for checkpoint in checkpoints]
    for checkpoint, layout in zip(checkpoints, full):
        unsupported = unsupported_reason(layout.architecture)
        if unsupported is not None and not allow_untested:
            raise PoolError(source, checkpoint.location, str(checkpoint.path), unsupported)
    # Each checkpoint against its own config.json first: of two that differ, the one whose config.json is
    # not its weights' is the one at fault.
    skeletons: Dict[bytes, Any] = {}
    mapped = [_self_consistent(layout, checkpoint, source, trust_remote_code, skeletons)
              for checkpoint, layout in zip(checkpoints, full)]
    reference = checkpoints[_common_architecture(checkpoints, [layout.architecture for layout in full], source)]
    # Every checkpoint's tensors as the reference's model loads them (a tied copy is left out, say).
    skeleton = _skeleton_for(reference, source, trust_remote_code, skeletons)
    loaded = []
    for checkpoint, layout, own in zip(checkpoints, full, mapped):
        same_model = skeletons[_config_key(checkpoint)] is skeleton
        on_reference = own if same_model else check_written(tensor_map(skeleton, layout.shapes), checkpoint, source)
        loaded.append(layout.restricted([n for n in layout.shapes if n in on_reference.targets], on_reference.targets,
                                        on_reference.left_out))
    index = _typical([tuple(sorted(layout.shapes.items())) for layout in loaded])
    reference, layout = checkpoints[index], loaded[index]
    for checkpoint, other in zip(checkpoints, loaded):

        def refuse(message: str, tensor: Optional[str] = None) -> PoolError:
            return PoolError(source, checkpoint.location, str(checkpoint.path), message + f" ({reference.location}, "
                             f"{reference.name}, has {_describe(layout, tensor) if tensor else layout.architecture})",
                             tensor=tensor)

        for tensor in layout.shapes:
            if tensor not in other.shapes:
                raise refuse(f"tensor {tensor} is missing", tensor) from None
            if other.shapes[tensor] != layout.shapes[tensor]:
                raise refuse(f"tensor {tensor} has shape {list(other.shapes[tensor])}", tensor)
        extra = sorted(set(other.shapes) - set(layout.shapes))
        if extra:
            raise PoolError(source, checkpoint.location, str(checkpoint.path),
                            f"tensor {extra[0]} is not in {reference.location} ({reference.name})", tensor=extra[0])
    return layout


def _typical(values: Sequence[Hashable]) -> int:
    """The index of the first of the most common values: what the others are compared with, so that an odd
    one out is the one named (on a tie, the later one, as in recipe order)."""
    counts = Counter(values)
    most = max(counts.values())
    return next(index for index, value in enumerate(values) if counts[value] == most)


def _common_architecture(checkpoints: Sequence[Checkpoint], architectures: Sequence[str], source: Path) -> int:
    """The index of the checkpoint whose architecture every other must share; PoolError naming one of another."""
    index = _typical(architectures)
    reference, architecture = checkpoints[index], architectures[index]
    for checkpoint, other in zip(checkpoints, architectures):
        if other != architecture:
            raise PoolError(source, checkpoint.location, str(checkpoint.path),
                            f"architecture {other} ({reference.location}, {reference.name}, has {architecture}): the "
                            "checkpoints of a pool share one architecture; check its config.json, or drop it from the pool")
    return index


def _config_key(checkpoint: Checkpoint) -> bytes:
    """What a model skeleton depends on: config.json as written (already read once, so readable)."""
    return (checkpoint.path / "config.json").read_bytes()


def _self_consistent(layout: TensorLayout, checkpoint: Checkpoint, source: Path, trust_remote_code: bool,
                     skeletons: Dict[bytes, Any]) -> TensorMap:
    """How the model built from the checkpoint's own config.json loads its tensors; PoolError when a parameter
    is left unwritten or a tensor's shape is not the parameter's (a config.json that is not these weights',
    e.g. another vocab_size), which transformers would refuse only when the candidates are loaded."""
    skeleton = _skeleton_for(checkpoint, source, trust_remote_code, skeletons)
    mapped = check_written(tensor_map(skeleton, layout.shapes), checkpoint, source)
    state = skeleton.state_dict()
    for tensor, target in mapped.targets.items():
        expected = tuple(state[target].shape)
        if layout.shapes[tensor] != expected:
            raise PoolError(source, checkpoint.location, str(checkpoint.path),
                            f"tensor {tensor} has shape {list(layout.shapes[tensor])} but the model its config.json "
                            f"describes has {list(expected)}{'' if target == tensor else f' for {target}'}: "
                            "config.json does not belong to these "
                            "weights (compare vocab_size and the layer sizes); copy in the one saved with them",
                            tensor=tensor)
    return mapped


def _describe(layout: TensorLayout, tensor: str) -> str:
    return f"shape {list(layout.shapes[tensor])}" if tensor in layout.shapes else "no such tensor"


def local_architectures(recipe: Recipe, source: Path) -> Dict[str, str]:
    """recipe field -> the architecture of each local checkpoint (pool and anchor), once the local checkpoints
    are known to be mergeable (check_compatible: config.json and the tensor headers, no tensor is loaded).
    Hub entries are checked as they are pulled."""
    pool = [resolve_local(entry, f"pool[{i}]", source)[0] for i, entry in enumerate(recipe.pool)
            if isinstance(entry, LocalCheckpoint)]
    base = resolve_local(recipe.base, "base", source) if isinstance(recipe.base, LocalCheckpoint) else []
    outside = [checkpoint for checkpoint in base if checkpoint.path not in {c.path for c in pool}]
    if not pool + outside:
        return {}
    layout = check_compatible(_unique_names(pool + outside), source, recipe.merge.trust_remote_code,
                              recipe.merge.allow_untested_architecture)
    return {checkpoint.location: layout.architecture for checkpoint in pool + base}


def resolve_pool(recipe: Recipe, source: Path, pins: Optional[Mapping[str, Any]] = None,
                 resolvers: Optional[Dict[type, Resolver]] = None) -> Pool:
    """Resolve every pool entry (and the anchor) to checkpoints, and check they can be merged.

    `pins` (hub_pool.pins_from_run of an earlier session) keep each unchanged Hub entry on
    the commits it was first resolved to.
    """
    hub_resolver = HubResolver(pins=pins or {}, trust_remote_code=recipe.merge.trust_remote_code,
                               refuse_untested=not recipe.merge.allow_untested_architecture)
    resolvers = {LocalCheckpoint: resolve_local, HubCheckpoints: hub_resolver, **(resolvers or {})}
    checkpoints: List[Checkpoint] = []
    for index, entry in enumerate(recipe.pool):
        resolved = resolvers[type(entry)](entry, f"pool[{index}]", source)
        for checkpoint in resolved:
            twin = next((c for c in checkpoints if c.repo and c.commit == checkpoint.commit), None)
            if twin is not None:
                raise PoolError(source, checkpoint.location, checkpoint.name,
                                f"is the commit {twin.location} resolves to as {twin.name}; a checkpoint may be listed once")
        checkpoints += resolved
    base = resolvers[type(recipe.base)](recipe.base, "base", source) if recipe.base is not None else []
    if len(base) > 1:
        raise PoolError(source, "base", recipe.base.label, f"resolves to {len(base)} checkpoints; the anchor must be one")
    members = {checkpoint.path for checkpoint in checkpoints}
    anchor_outside = [checkpoint for checkpoint in base if checkpoint.path not in members]
    named = _unique_names(checkpoints + anchor_outside)
    layout = check_compatible(named, source, recipe.merge.trust_remote_code, recipe.merge.allow_untested_architecture)
    pool_part = named[: len(checkpoints)]
    if anchor_outside:
        base_checkpoint: Optional[Checkpoint] = named[-1]
    elif base:  # the anchor is also a pool member: one name for one folder
        base_checkpoint = next(c for c in pool_part if c.path == base[0].path)
    else:
        base_checkpoint = None
    return Pool(checkpoints=tuple(pool_part), base=base_checkpoint, layout=layout, source=source)
