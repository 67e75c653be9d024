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
Either way each checkpoint tensor is checked for NaN and inf once, when it is first read (at the start
in memory, at the first candidate that reads it when streamed): one such tensor would make every merge
that reads its checkpoint non-finite. Each merged candidate is checked too (one reduction per tensor):
a merge that overflows its dtype fails as a candidate instead of being scored.
Either way mergekit merges one chunk of tensors (about CHUNK_BYTES of one checkpoint) at a
time on the model's device and the result is copied into the model, so the device holds the
model plus about (checkpoints + 2) × CHUNK_BYTES, whatever the size of the pool.
The pool fits when its bytes are at most MERGEKIT_RECYCLE_POOL_MEMORY, by default half of
the memory available when the run starts.
"""

from typing import Dict, Iterator, List, Optional, Set, Tuple

import psutil
import torch
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_recycle import constants
from mergekit_recycle.architecture import tensor_map
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.errors import NonFiniteMergeError, NonFiniteTensorError, PoolError, SettingError, one_line
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
    """The model every candidate is merged into (built from the first checkpoint) and the tokenizer:
    the first of the pool's checkpoints, then the anchor, whose folder has tokenizer files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    first = pool.checkpoints[0]
    try:
        model = AutoModelForCausalLM.from_pretrained(first.path, dtype=TORCH_DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code).to(device).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise PoolError(pool.source, first.location, str(first.path),
                        f"transformers cannot load it ({one_line(exc, 200)})") from None
    model.requires_grad_(False)
    # The rule of the final merge (merge.has_tokenizer, whatever the weights), so that the merged
    # model gets the tokenizer that was scored.
    from mergekit_recycle.merge import TOKENIZER_FILES, has_tokenizer

    donor = next((checkpoint for checkpoint in pool.inputs if has_tokenizer(checkpoint.path)), None)
    if donor is None:
        raise PoolError(pool.source, first.location, str(first.path), "no checkpoint of the pool has a tokenizer "
                        f"({', '.join(TOKENIZER_FILES)}); add the tokenizer files to one")
    try:
        return model, AutoTokenizer.from_pretrained(donor.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PoolError(pool.source, donor.location, str(donor.path), "transformers cannot load its tokenizer "
                        f"({one_line(exc, 200)}); fix its tokenizer files") from None


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
        self.finite: Set[Tuple[str, str]] = set()  # (checkpoint, tensor) read and found finite
        if self.in_memory:
            for checkpoint in pool.inputs:
                self.stored[checkpoint.name] = {name: self._read(checkpoint.name, name, "cpu") for name in self.names}
                self.loaders[checkpoint.name].flush()

    def _read(self, checkpoint: str, name: str, device: str) -> torch.Tensor:
        """A checkpoint tensor from disk, checked for NaN and inf the first time it is read."""
        tensor = self.loaders[checkpoint].get_tensor(name, device=device)
        if (checkpoint, name) not in self.finite:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                where = self.pool.by_name(checkpoint)
                raise NonFiniteTensorError(self.pool.source, where.location, str(where.path), name,
                                           nan=int(torch.isnan(tensor).sum()), inf=int(torch.isinf(tensor).sum()))
            self.finite.add((checkpoint, name))
        return tensor

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
        return {name: self._read(checkpoint, name, str(self.device)) for name in names}

    @torch.no_grad()
    def merge(self, merge: Merge) -> None:
        """Merge the proposal and copy it into the model. Checkpoints with weight 0 are not read.
        NonFiniteMergeError when a merged parameter holds NaN or inf (the model is then left half written)."""
        inputs = merge.nonzero()
        base = self.pool.base.name if self.pool.base is not None and merge.scale != 1.0 else None
        if base is not None and base not in inputs:
            inputs.append(base)
        parameters = {"weight": {name: merge.weights.get(name, 0.0) for name in inputs}}
        sums: List[Tuple[str, torch.Tensor]] = []
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
                sums.append((name, tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)))
        self._check_finite(sums, merge)

    def _check_finite(self, sums: List[Tuple[str, torch.Tensor]], merge: Merge) -> None:
        """NonFiniteMergeError naming the first merged tensor that holds NaN or inf. A tensor's sum is
        non-finite when any of its values is, so one fused reduction per tensor and one device sync per
        candidate screen them; a sum that overflows with finite values is told apart by looking at them."""
        if bool(torch.isfinite(torch.stack([total for _, total in sums])).all()):
            return
        for name, total in sums:
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(self.targets[self.destination[name]]).all()):
                raise NonFiniteMergeError(name, str(self.dtype).removeprefix("torch."), merge.scale)
