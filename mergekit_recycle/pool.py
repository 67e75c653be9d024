"""The pool: recipe entries resolved to checkpoint folders, checked to be mergeable.

Resolution turns each recipe entry into one or more `Checkpoint`s with a readable name
and a pinned source. Local folders resolve to themselves; Hub entries go through a
resolver of their own (the Hub issue plugs it in) and must yield the same kind of
`Checkpoint`, so nothing downstream knows where a checkpoint came from.

Before anything is evaluated, every checkpoint is checked against the first: the same
architecture, the same tensor names and the same shapes, read from config.json and the
safetensors headers (no tensor is loaded).
"""

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from mergekit_recycle.errors import PoolError
from mergekit_recycle.recipe import HubCheckpoints, LocalCheckpoint, PoolEntry, Recipe


class Checkpoint(BaseModel):
    """One mergeable checkpoint folder, with the name reports use and where it came from."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    location: str  # the recipe field it came from, e.g. `pool[3]`
    source: str  # what pins it: a local path, or repo@revision@sha


class TensorLayout(BaseModel):
    """What every checkpoint of a pool shares: architecture, tensor names, shapes and dtypes."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    nbytes: int  # of one checkpoint's tensors as stored


class Pool(BaseModel):
    """The resolved pool (and anchor) of a recipe, known to be mergeable."""

    model_config = ConfigDict(frozen=True)

    checkpoints: Tuple[Checkpoint, ...]
    base: Optional[Checkpoint]
    layout: TensorLayout
    source: Path  # the recipe file, named in errors

    @property
    def names(self) -> List[str]:
        return [checkpoint.name for checkpoint in self.checkpoints]

    @property
    def inputs(self) -> List[Checkpoint]:
        """Every checkpoint a merge may read: the pool, then the anchor (unless it is a pool member)."""
        extra = [self.base] if self.base is not None and self.base not in self.checkpoints else []
        return list(self.checkpoints) + extra

    def by_name(self, name: str) -> Checkpoint:
        return next(checkpoint for checkpoint in self.inputs if checkpoint.name == name)


Resolver = Callable[[PoolEntry, str, Path], List[Checkpoint]]


def resolve_local(entry: LocalCheckpoint, location: str, source: Path) -> List[Checkpoint]:
    return [Checkpoint(name=entry.path.name, path=entry.path, location=location, source=str(entry.path))]


def resolve_hub_unavailable(entry: HubCheckpoints, location: str, source: Path) -> List[Checkpoint]:
    raise PoolError(source, location, entry.repo, "pulling checkpoints from the Hub is not available in this version; "
                    "download them and list their folders with `path:`")


RESOLVERS: Dict[type, Resolver] = {LocalCheckpoint: resolve_local, HubCheckpoints: resolve_hub_unavailable}


def _unique_names(checkpoints: List[Checkpoint]) -> List[Checkpoint]:
    """Folder names are the readable names; where two clash, their parent folders tell them apart."""
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
        config = json.loads((checkpoint.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot read config.json ({exc})") from None
    architecture = ",".join(config.get("architectures") or [config.get("model_type") or "unknown"])
    try:
        index = ShardedTensorIndex.from_disk(str(checkpoint.path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise refuse(f"no model weights found ({exc})") from None
    if not index.is_safetensors:
        raise refuse("has only pickle weights (pytorch_model.bin); convert them to safetensors to merge them")
    shapes, dtypes, nbytes = {}, {}, 0
    for shard in index.shards:
        path = checkpoint.path / shard.filename
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    sliced = handle.get_slice(key)
                    shapes[key] = tuple(sliced.get_shape())
                    dtypes[key] = sliced.get_dtype()
                    count = 1
                    for size in shapes[key]:
                        count *= size
                    nbytes += count * _DTYPE_BYTES.get(dtypes[key], 4)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise refuse(f"cannot read {shard.filename} ({type(exc).__name__}: {exc})") from None
    return TensorLayout(architecture=architecture, shapes=shapes, dtypes=dtypes, nbytes=nbytes)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_compatible(checkpoints: List[Checkpoint], source: Path) -> TensorLayout:
    """The layout every checkpoint shares; PoolError naming the first checkpoint and tensor that differ."""
    reference = checkpoints[0]
    layout = _read_layout(reference, source)
    for checkpoint in checkpoints[1:]:
        other = _read_layout(checkpoint, source)

        def refuse(message: str, tensor: Optional[str] = None) -> PoolError:
            return PoolError(source, checkpoint.location, str(checkpoint.path), message + f" ({reference.location}, "
                             f"{reference.name}, has {_describe(layout, tensor) if tensor else layout.architecture})",
                             tensor=tensor)

        if other.architecture != layout.architecture:
            raise refuse(f"architecture {other.architecture}")
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


def _describe(layout: TensorLayout, tensor: str) -> str:
    return f"shape {list(layout.shapes[tensor])}" if tensor in layout.shapes else "no such tensor"


def resolve_pool(recipe: Recipe, source: Path, resolvers: Optional[Dict[type, Resolver]] = None) -> Pool:
    """Resolve every pool entry (and the anchor) to checkpoints, and check they can be merged."""
    resolvers = {**RESOLVERS, **(resolvers or {})}
    checkpoints: List[Checkpoint] = []
    for index, entry in enumerate(recipe.pool):
        checkpoints += resolvers[type(entry)](entry, f"pool[{index}]", source)
    base = resolvers[type(recipe.base)](recipe.base, "base", source) if recipe.base is not None else []
    if len(base) > 1:
        raise PoolError(source, "base", recipe.base.label, f"resolves to {len(base)} checkpoints; the anchor must be one")
    members = {checkpoint.path for checkpoint in checkpoints}
    anchor_outside = [checkpoint for checkpoint in base if checkpoint.path not in members]
    named = _unique_names(checkpoints + anchor_outside)
    layout = check_compatible(named, source)
    pool_part = named[: len(checkpoints)]
    if anchor_outside:
        base_checkpoint: Optional[Checkpoint] = named[-1]
    elif base:  # the anchor is also a pool member: one name for one folder
        base_checkpoint = next(c for c in pool_part if c.path == base[0].path)
    else:
        base_checkpoint = None
    return Pool(checkpoints=tuple(pool_part), base=base_checkpoint, layout=layout, source=source)
