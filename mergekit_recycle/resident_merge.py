"""Merging a proposal into one resident model, through mergekit's in-memory API.

The model is built once. For each proposal, mergekit's `merge_state_dicts` runs
recycle_linear over the checkpoints' tensors and the results are copied into the model's
parameters in place: no file is written and no model is built per candidate.

Where the tensors come from:
  - in memory, when the pool fits: every checkpoint (and the anchor) is read once, through
    mergekit's LazyTensorLoader, and kept in host memory. This needs (checkpoints + anchor)
    × one checkpoint's bytes as stored, plus the resident model;
  - streamed, otherwise: the loader reads each chunk from each checkpoint with a non-zero
    weight for every candidate, from disk (or the page cache). This needs about
    (checkpoints + 2) × CHUNK_BYTES of host memory plus the resident model.
Either way mergekit merges one chunk of tensors (about CHUNK_BYTES of one checkpoint) at a
time on the model's device and the result is copied into the model, so the device holds the
model plus about (checkpoints + 2) × CHUNK_BYTES, whatever the size of the pool.
The pool fits when its bytes are at most MERGEKIT_RECYCLE_POOL_MEMORY, by default half of
the memory available when the run starts.
"""

from typing import Dict, Iterator, List, Optional

import psutil
import torch
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_recycle import constants
from mergekit_recycle.architecture import tensor_map
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import PoolError, SettingError
from mergekit_recycle.pool import Pool, check_written
from mergekit_recycle.proposal import Merge

CHUNK_BYTES = 256 * 2**20

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def pool_memory_limit() -> int:
    limit = constants.env_bytes(constants.POOL_MEMORY_VARIABLE)
    return limit if limit is not None else psutil.virtual_memory().available // 2


def pool_fits_in_memory(pool: Pool) -> bool:
    return pool.layout.nbytes * len(pool.inputs) <= pool_memory_limit()


def resolve_device(device: str) -> str:
    """`auto` is the first GPU when there is one, else the CPU; a GPU asked for must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("--device", device, "a device torch can use: no CUDA GPU is visible here (try auto or cpu)")
    return device


def load_resident_model(pool: Pool, dtype: str, device: str, trust_remote_code: bool = False):
    """The model every candidate is merged into (built from the first checkpoint) and the tokenizer
    (the first checkpoint's, else the first other checkpoint that has one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    first = pool.checkpoints[0]
    try:
        model = AutoModelForCausalLM.from_pretrained(first.path, dtype=TORCH_DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code).to(device).eval()
    except (OSError, ValueError) as exc:
        raise PoolError(pool.source, first.location, str(first.path), f"transformers cannot load it ({exc})") from None
    model.requires_grad_(False)
    for checkpoint in pool.inputs:
        try:
            return model, AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            continue
    raise PoolError(pool.source, first.location, str(first.path),
                    "no checkpoint of the pool has a tokenizer that transformers can load; add the tokenizer files")


class ResidentMerger:
    """Writes the merge of a proposal into `model`'s parameters, in place.

    Each checkpoint tensor goes where transformers loads it (architecture.tensor_map: GPT-NeoX's
    `embed_out.weight` into `lm_head.weight`); a tied parameter is written once and stays tied.
    Checkpoint tensors the model does not load (old rotary `inv_freq` buffers, attention masks) are
    left out, as the model recomputes them. A model parameter that no tensor writes is refused
    before anything is evaluated: it would keep the first checkpoint's values in every candidate.
    """

    def __init__(self, pool: Pool, model: torch.nn.Module, dtype: str, in_memory: Optional[bool] = None):
        self.pool = pool
        self.dtype = TORCH_DTYPES[dtype]
        self.in_memory = pool_fits_in_memory(pool) if in_memory is None else in_memory
        self.targets = model.state_dict()  # views of the parameters: copying into them updates the model
        # Mapped again on the model itself (the pool check mapped a skeleton of it): what is written is what it has.
        first = pool.checkpoints[0]
        self.destination = check_written(tensor_map(model, pool.layout.shapes), first, pool.source).targets
        self.names = [name for name in pool.layout.shapes if name in self.destination]
        if not self.names:
            raise PoolError(pool.source, first.location, str(first.path),
                            f"none of its tensors is a parameter of the {pool.layout.architecture} model built from it")
        self.device = next(model.parameters()).device
        self.loaders = {c.name: LazyTensorLoader(ShardedTensorIndex.from_disk(str(c.path))) for c in pool.inputs}
        self.stored: Dict[str, Dict[str, torch.Tensor]] = {}
        if self.in_memory:
            for checkpoint in pool.inputs:
                self.stored[checkpoint.name] = {name: self.loaders[checkpoint.name].get_tensor(name) for name in self.names}
                self.loaders[checkpoint.name].flush()

    def _chunks(self) -> Iterator[List[str]]:
        """Tensor names in groups of about CHUNK_BYTES (of one checkpoint, in float32): what is merged at once,
        so that the merge device never holds more than (checkpoints + 1) chunks."""
        chunk, size = [], 0
        for name in self.names:
            numel = 1
            for dim in self.pool.layout.shapes[name]:
                numel *= dim
            if chunk and size + numel * 4 > CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
            chunk.append(name)
            size += numel * 4
        if chunk:
            yield chunk

    def _tensors(self, checkpoint: str, names: List[str]) -> Dict[str, torch.Tensor]:
        if self.in_memory:
            tensors = self.stored[checkpoint]
            return {name: tensors[name].to(self.device, non_blocking=True) for name in names}
        return {name: self.loaders[checkpoint].get_tensor(name, device=str(self.device)) for name in names}

    @torch.no_grad()
    def merge(self, merge: Merge) -> None:
        """Merge the proposal and copy it into the model. Checkpoints with weight 0 are not read."""
        inputs = merge.nonzero()
        base = self.pool.base.name if self.pool.base is not None and merge.scale != 1.0 else None
        if base is not None and base not in inputs:
            inputs.append(base)
        parameters = {"weight": {name: merge.weights.get(name, 0.0) for name in inputs}}
        if base is not None:
            parameters["scale"] = merge.scale
        for names in self._chunks():
            merged = merge_state_dicts(
                {name: self._tensors(name, names) for name in inputs},
                RECYCLE_LINEAR,
                parameters=parameters,
                base=base,
                dtype=self.dtype,
            )
            for name, tensor in merged.items():
                self.targets[self.destination[name]].copy_(tensor)
