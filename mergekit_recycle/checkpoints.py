"""The checkpoint and pool types: what a resolved pool is, apart from how it is resolved (pool.py).

A `Checkpoint` is one mergeable folder on disk with a readable name and a pinned source, wherever
it came from (a local path, or a Hub commit that hub_pool.py downloaded); a `Pool` is the
checkpoints of a recipe and their shared `TensorLayout`, once pool.py checked they can be merged.
"""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_bytes(shape: Tuple[int, ...], dtype: str) -> int:
    """The size of one stored tensor (a dtype safetensors does not name counts 4 bytes an element)."""
    count = 1
    for size in shape:
        count *= size
    return count * DTYPE_BYTES.get(dtype, 4)


class Checkpoint(BaseModel):
    """One mergeable checkpoint folder, with the name reports use and where it came from."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    location: str  # the recipe field it came from, e.g. `pool[3]`
    source: str  # what pins it: a local path, or repo@revision@sha[/subfolder]
    allow_pickle: bool = False
    # Where a Hub checkpoint comes from; None for a local folder.
    repo: Optional[str] = None
    revision: Optional[str] = None
    subfolder: Optional[str] = None
    sha: Optional[str] = None

    @property
    def published_source(self) -> str:
        """`source` as published files give it: a local folder by its name, never this machine's path."""
        return self.source if self.repo else f"local:{self.name}"

    @property
    def published_reference(self) -> str:
        """`reference` as published files give it: a local folder by a relative path, which can never be
        taken for a Hub repo id (a name may be `parent/folder`)."""
        return self.reference if self.repo else f"./{self.name}"

    @property
    def commit(self) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        """What identifies a Hub checkpoint's weights: repo (case-insensitive, as on the Hub), commit, folder."""
        return (self.repo and self.repo.lower(), self.sha, self.subfolder)

    @property
    def reference(self) -> str:
        """How a mergekit YAML names it anywhere: `repo@sha`, `hf://repo@sha/subfolder`
        (read by `mergekit-recycle merge`), or the local path."""
        if self.repo is None:
            return str(self.path)
        if self.subfolder:
            return f"hf://{self.repo}@{self.sha}/{self.subfolder}"
        return f"{self.repo}@{self.sha}"


class TensorLayout(BaseModel):
    """What every checkpoint of a pool shares: architecture, the tensors a merge reads (names,
    shapes, dtypes), and where the model loads them."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    nbytes: int  # of one checkpoint's merged tensors as stored
    # checkpoint tensor -> the model's state-dict key (see architecture.TensorMap); None before it was mapped
    targets: Optional[Dict[str, str]] = None
    left_out: Tuple[str, ...] = ()  # tensors of the first checkpoint the model does not load

    def restricted(self, names: List[str], targets: Dict[str, str], left_out: Tuple[str, ...]) -> "TensorLayout":
        """The layout of the tensors a merge reads."""
        return self.model_copy(update={
            "shapes": {n: self.shapes[n] for n in names}, "dtypes": {n: self.dtypes[n] for n in names},
            "nbytes": sum(tensor_bytes(self.shapes[n], self.dtypes[n]) for n in names),
            "targets": targets, "left_out": left_out})


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
