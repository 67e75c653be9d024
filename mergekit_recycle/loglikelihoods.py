"""The forward work of a candidate: log-likelihood requests, prepared once, scored per candidate.

The requests never change between candidates, only the weights do. So each request's input is
built once as lm-eval's HFLM builds it (context + continuation, truncated on the left to the
model's length, last token dropped), and what many requests share is run once:

  - Shared prefixes. Requests whose inputs start with the same context (every multiple-choice
    question) are packed into one row: the context once, then each continuation's tokens, each
    attending to the context and to itself only (a block attention mask) at the positions it
    would have on its own. A one-token continuation needs no tokens of its own: it is read at the
    context's last position, which is lm-eval's one-token grouping.
  - Identical inputs run once.

Logits are computed only at the positions that hold a continuation token (`logits_to_keep`):
a batch × length × vocabulary tensor would not fit on a GPU for a large vocabulary. The
log-probabilities and greedy checks of all continuation tokens are gathered at once.

Packing needs a model that honours a 4D attention mask and position ids (transformers' causal
LMs do); it is checked on the first candidate against the unpacked rows, and a model that gives
other values is scored unpacked, as lm-eval scores it, for the rest of the run.
"""

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_recycle.constants import UNMEASURED_BATCH_SIZE
from mergekit_recycle.errors import one_line

# Largest difference in a request's log-likelihood, between packed and unpacked rows, that is
# rounding: in float32 the tolerance against lm-eval; in half precision the two layouts
# round differently by about 1e-3 (bfloat16 keeps 8 bits of mantissa), while a mask that is not
# honoured moves log-likelihoods by tenths.
PACKING_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Rows of the first batch checked against their unpacked twins on the first candidate.
CHECKED_ROWS = 64
# Block masks are kept between candidates up to this size; larger ones are built for each batch.
CACHED_MASK_BYTES = 64 * 2**20


@dataclass
class Row:
    """One input row: a prefix, then segments that each attend only to the prefix and themselves."""

    prefix: Tuple[int, ...]
    segments: Dict[Tuple[int, ...], int]  # segment tokens -> offset in the row

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(segment) for segment in self.segments)

    @property
    def packed(self) -> bool:
        """Whether the row needs a block mask: more than one segment with tokens of its own."""
        return sum(1 for segment in self.segments if segment) > 1

    def add(self, segment: Tuple[int, ...]) -> int:
        if segment not in self.segments:
            self.segments[segment] = self.length
        return self.segments[segment]

    def tokens_and_layout(self) -> Tuple[List[int], List[int], List[int]]:
        """(tokens, position ids, segment ids: 0 for the prefix, 1, 2, ... for the segments)."""
        tokens, positions, segments = list(self.prefix), list(range(len(self.prefix))), [0] * len(self.prefix)
        for number, segment in enumerate(self.segments, start=1):
            tokens += segment
            positions += range(len(self.prefix), len(self.prefix) + len(segment))
            segments += [number] * len(segment)
        return tokens, positions, segments


@dataclass
class Batch:
    tokens: torch.Tensor  # (rows, length), padded on the right
    positions: Optional[torch.Tensor]  # (rows, length); None: 0, 1, 2, ... (no packed row)
    segments: Optional[torch.Tensor]  # (rows, length); -1 on padding; None with positions
    keep: torch.Tensor  # the columns whose logits are needed
    rows: torch.Tensor  # per continuation token: its row,
    columns: torch.Tensor  # its column among `keep`,
    targets: torch.Tensor  # the token it should be,
    places: torch.Tensor  # its place among all continuation tokens
    mask: Optional[torch.Tensor] = None  # the block mask, when cached


def _nan_first(gap: float) -> float:
    return math.inf if math.isnan(gap) else gap


def request_inputs(encoded, max_length: int) -> List[Tuple[List[int], int, List[int]]]:
    """Per request (as `(args, context tokens, continuation tokens)`): lm-eval's input row (context +
    continuation, truncated on the left to max_length + 1 tokens, last token dropped), the column
    whose logits predict the continuation's first token, and the continuation."""
    inputs = []
    for _, context, continuation in encoded:
        tokens = (context + continuation)[-(max_length + 1):][:-1]
        inputs.append((tokens, len(tokens) - len(continuation), continuation))
    return inputs


def sliding_window(config) -> Optional[int]:
    """The attention window of a model that limits some layers to one (Mistral, Phi-3, Gemma 2), else None."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class RowLayout:
    """Where each request's tokens go: the rows (one per shared prefix, or per distinct input), and per
    continuation token its row, column, target and request; no tensors yet."""

    def __init__(self, encoded, max_length: int, shared_prefix: bool = True, window: Optional[int] = None):
        inputs = request_inputs(encoded, max_length)
        self.shared_prefix = shared_prefix and (window is None or all(len(tokens) <= window for tokens, _, _ in inputs))
        self.rows: Dict[tuple, Row] = {}
        self.request_rows: List[Optional[Row]] = []
        self.owners, self.located, self.targets = [], [], []  # per continuation token
        for index, (tokens, start, continuation) in enumerate(inputs):
            if not continuation:  # log P(nothing) = 0: no logits to read (lm-eval refuses such a request)
                self.request_rows.append(None)
                continue
            if self.shared_prefix:
                # The prefix ends with the token that predicts the continuation's first token.
                row = self.rows.setdefault(tuple(tokens[:start + 1]), Row(tuple(tokens[:start + 1]), {}))
                offset = row.add(tuple(tokens[start + 1:]))
                columns = [start] + list(range(offset, offset + len(continuation) - 1))
            else:
                row = self.rows.setdefault(tuple(tokens), Row(tuple(tokens), {}))
                columns = list(range(start, start + len(continuation)))
            self.request_rows.append(row)
            self.owners += [index] * len(continuation)
            self.located += [(row, column) for column in columns]
            self.targets += continuation


class PreparedLoglikelihoods:
    """A fixed list of log-likelihood requests, batched once; `score(model)` per candidate.

    `shared_prefix=False` gives one row per distinct input, as lm-eval runs them; so does a model
    with a sliding `window` shorter than some input (a block mask cannot say which layers slide).
    """

    def __init__(self, encoded, max_length: int, batch_size: int, device, shared_prefix: bool = True,
                 window: Optional[int] = None):
        self.encoded = list(encoded)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        layout = RowLayout(self.encoded, max_length, shared_prefix, window)
        self.shared_prefix, self.request_rows = layout.shared_prefix, layout.request_rows
        self.count = len(self.encoded)
        self.tokens = len(layout.targets)
        self.owner = torch.tensor(layout.owners, dtype=torch.long, device=device)
        self.rows = list(layout.rows.values())
        self.batches = self._batches(layout.located, layout.targets)
        self.forward_tokens = sum(row.length for row in self.rows)
        self.padded_tokens = sum(batch.tokens.numel() for batch in self.batches)
        self.keep_supported = True
        self.cached_mask_bytes = 0
        self.checked = not any(row.packed for row in self.rows)  # nothing to check without a block mask
        self.fallback: Optional[PreparedLoglikelihoods] = None
        self.note: Optional[str] = None

    def _batches(self, located, targets) -> List[Batch]:
        order = sorted(self.rows, key=lambda row: row.length, reverse=True)  # similar lengths: less padding
        where = {}
        batches = []
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            width = chunk[0].length
            tokens = torch.zeros((len(chunk), width), dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.long)  # padding at 0: within any position table
            segments = torch.full((len(chunk), width), -1, dtype=torch.long)
            for slot, row in enumerate(chunk):
                row_tokens, row_positions, row_segments = row.tokens_and_layout()
                tokens[slot, :len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
                positions[slot, :len(row_tokens)] = torch.tensor(row_positions, dtype=torch.long)
                segments[slot, :len(row_tokens)] = torch.tensor(row_segments, dtype=torch.long)
                where[id(row)] = (len(batches), slot)
            packed = any(row.packed for row in chunk)
            batches.append([tokens, positions if packed else None, segments if packed else None])
        per_batch: List[list] = [[] for _ in batches]
        for place, ((row, column), target) in enumerate(zip(located, targets)):
            number, slot = where[id(row)]
            per_batch[number].append((slot, column, target, place))
        prepared = []
        for (tokens, positions, segments), mine in zip(batches, per_batch):
            keep = sorted({column for _, column, _, _ in mine})
            kept = {column: i for i, column in enumerate(keep)}
            columns = [keep, [s for s, _, _, _ in mine], [kept[c] for _, c, _, _ in mine],
                       [t for _, _, t, _ in mine], [p for _, _, _, p in mine]]
            batch = Batch(tokens.to(self.device), *(None if t is None else t.to(self.device) for t in (positions, segments)),
                          *(torch.tensor(c, dtype=torch.long, device=self.device) for c in columns))
            prepared.append(batch)
        return prepared

    @staticmethod
    def block_mask(segments: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """The 4D mask (rows, 1, length, length) of packed rows: a token attends to the tokens before it
        in its own segment and in the prefix (segment 0); padding (-1) to the prefix and the padding
        before it, so that no row of the mask is empty. Boolean (True: attend) for `dtype` None, as
        transformers' SDPA attention takes it; else additive, as its eager attention takes it."""
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
        query, key = segments.unsqueeze(2), segments.unsqueeze(1)
        allowed = (causal & ((key == 0) | (key == query))).unsqueeze(1)
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def _mask(self, batch: Batch, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        if batch.segments is None:
            return None  # plain causal rows, padded on the right: nothing attends to the padding
        if batch.mask is not None and batch.mask.dtype == (dtype or torch.bool):
            return batch.mask
        mask = self.block_mask(batch.segments, dtype)
        size = mask.numel() * mask.element_size()
        if self.cached_mask_bytes + size <= CACHED_MASK_BYTES:
            batch.mask = mask
            self.cached_mask_bytes += size
        return mask

    def _logits(self, model, batch: Batch, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """Logits at the kept positions, (rows, kept, vocabulary)."""
        inputs = {"use_cache": False}  # a cache of every layer's keys and values would only take memory
        if batch.segments is not None:
            inputs.update(attention_mask=self._mask(batch, dtype), position_ids=batch.positions)
        if self.keep_supported:
            try:
                logits = model(batch.tokens, logits_to_keep=batch.keep, **inputs).logits
                if logits.shape[1] == len(batch.keep):
                    return logits
            except TypeError:  # a model class without logits_to_keep
                pass
            self.keep_supported = False  # or one that takes it in **kwargs and ignores it
        return model(batch.tokens, **inputs).logits[:, batch.keep]

    @torch.no_grad()
    def score(self, model) -> List[tuple]:
        """(sum of continuation log-probs, whether the continuation is the greedy one) per request."""
        if not self.checked:
            return self._checked_score(model)
        if self.fallback is not None:
            return self.fallback.score(model)
        return self._score(model)

    def _score(self, model) -> List[tuple]:
        # A boolean mask for SDPA attention (a quarter of a float32 mask's bytes), additive otherwise.
        sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        dtype = None if sdpa else next(model.parameters()).dtype
        logprob = torch.empty(self.tokens, dtype=torch.float64, device=self.device)
        greedy = torch.empty(self.tokens, dtype=torch.bool, device=self.device)
        for batch in self.batches:
            picked = torch.log_softmax(self._logits(model, batch, dtype)[batch.rows, batch.columns].float(), dim=-1)
            logprob[batch.places] = picked.gather(1, batch.targets.unsqueeze(1)).squeeze(1).double()
            greedy[batch.places] = picked.argmax(dim=-1) == batch.targets
        totals = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        totals.index_add_(0, self.owner, logprob)
        misses = torch.zeros(self.count, dtype=torch.long, device=self.device)
        misses.index_add_(0, self.owner, (~greedy).long())
        return list(zip(totals.tolist(), (misses == 0).tolist()))

    def _checked_score(self, model) -> List[tuple]:
        """Score packed, and the requests of a sample of packed rows (the longest, and a spread over the
        rest) unpacked too; at a difference beyond rounding (or a model that refuses the mask), score
        unpacked from now on."""
        self.checked = True
        packed_rows = sorted((row for row in self.rows if row.packed), key=lambda row: row.length, reverse=True)
        step = max(1, len(packed_rows) // CHECKED_ROWS)
        checked_rows = {id(row) for row in packed_rows[:CHECKED_ROWS // 2] + packed_rows[::step][:CHECKED_ROWS // 2]}
        sample = [index for index, row in enumerate(self.request_rows) if id(row) in checked_rows]
        dtype = next(model.parameters()).dtype
        tolerance = PACKING_TOLERANCE.get(dtype, PACKING_TOLERANCE[torch.float32])
        try:
            packed = self._score(model)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a model class may reject a 4D mask in any way
            problem = f"it refuses the block mask: {one_line(exc, 200)}"
        else:
            unpacked = PreparedLoglikelihoods([self.encoded[i] for i in sample], self.max_length, self.batch_size,
                                              self.device, shared_prefix=False)._score(model)
            gaps = [abs(packed[i][0] - u[0]) for i, u in zip(sample, unpacked)]
            # Greedy checks may flip at near-ties in half precision; in float32 they must agree.
            greedy_differs = dtype in (torch.float32, torch.float64) and any(
                packed[i][1] != u[1] for i, u in zip(sample, unpacked))
            problem = None
            if not all(gap <= tolerance for gap in gaps) or greedy_differs:  # NaN fails too
                problem = (f"log-likelihoods differ from one row per request by up to {max(gaps, key=_nan_first):.1e} "
                           f"(tolerance {tolerance:g} in {str(dtype).removeprefix('torch.')})"
                           + (" and greedy checks differ" if greedy_differs else ""))
        if problem is None:
            return packed
        self.note = (f"shared-prefix scoring is off for this run: with {type(model).__name__} {problem}; each "
                     "request is scored in a row of its own, as lm-eval does")
        self.fallback = PreparedLoglikelihoods(self.encoded, self.max_length, self.batch_size, self.device,
                                               shared_prefix=False)
        self.batches, self.rows = [], []  # the packed batches are not used again
        return self.fallback.score(model)

    def statistics(self) -> Dict[str, int]:
        """What one candidate feeds the model: rows, batches, tokens (real and with padding)."""
        active = self.fallback or self
        return {"requests": self.count, "rows": len(active.rows), "batches": len(active.batches),
                "tokens": active.forward_tokens, "padded": active.padded_tokens,
                "shared_prefix": active.shared_prefix}


# --batch-size auto: the batch sizes tried (rows per forward pass), where in the length order the
# batches timed on a CPU are taken, how close to the best throughput counts as the plateau, and the
# share of a GPU's free memory the largest batch may take (the rest: headroom for the allocator).
AUTO_BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256, 512)
TIMED_AT = (0.25, 0.75)
PLATEAU = 1.05
GPU_MEMORY_SHARE = 0.8


def choose_batch_size(model, encoded, max_length: int, device, shared_prefix: bool = True,
                      window: Optional[int] = None) -> Tuple[int, str]:
    """(the batch size, in rows per forward pass, for scoring `encoded` requests with `model`; how it was
    chosen).

    On a GPU, the largest that fits: the longest rows in batches of growing size until one runs out of
    memory or takes more than GPU_MEMORY_SHARE of what is free. On a CPU, the throughput plateau: at
    each size, batches of rows of neighbouring lengths (as scoring batches them) timed per row, until
    a size is slower than the best so far, and the smallest size within PLATEAU of the fastest (larger
    batches only add memory there)."""
    if not encoded:
        return UNMEASURED_BATCH_SIZE, "no log-likelihood requests to measure on: the default"
    layout = RowLayout(encoded, max_length, shared_prefix, window)
    rows = list(layout.rows.values())
    by_length = sorted(range(len(rows)), key=lambda i: rows[i].length, reverse=True)

    def requests_of(chosen: Sequence[int]) -> list:
        wanted = {id(rows[i]) for i in chosen}
        return [request for request, row in zip(encoded, layout.request_rows) if id(row) in wanted]

    def prepared(chosen: Sequence[int], size: int) -> PreparedLoglikelihoods:
        batches = PreparedLoglikelihoods(requests_of(chosen), max_length, size, device, layout.shared_prefix)
        batches.checked = True  # timing only: the first candidate checks the packing
        return batches

    if torch.device(device).type == "cuda":
        return _largest_fitting(model, prepared, by_length, device)
    per_row = {}
    for size in AUTO_BATCH_SIZES:
        # Batches as scoring makes them: rows of neighbouring lengths, here from two places in the order.
        chunks = [by_length[start:start + size] for start in
                  sorted({min(int(share * len(by_length)), max(len(by_length) - size, 0)) for share in TIMED_AT})]
        seconds = 0.0
        for chunk in chunks:
            batch = prepared(chunk, size)
            timings = []
            for _ in range(2):  # the faster of two: a neighbour on the machine slows one, rarely both
                start = time.perf_counter()
                batch.score(model)
                timings.append(time.perf_counter() - start)
            seconds += min(timings)
        per_row[size] = seconds / sum(len(chunk) for chunk in chunks)
        if size >= len(by_length) or per_row[size] > PLATEAU * min(per_row.values()):
            break  # all rows in one batch, or past the plateau
    best = min(per_row.values())
    chosen = min(size for size, taken in per_row.items() if taken <= PLATEAU * best)
    return chosen, f"the throughput plateau, timed on batches of {', '.join(map(str, per_row))} rows"


def _largest_fitting(model, prepared, by_length: List[int], device) -> Tuple[int, str]:
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = GPU_MEMORY_SHARE * (free + torch.cuda.memory_allocated(device))
    chosen = None
    for size in AUTO_BATCH_SIZES:
        rows = prepared(by_length[:size], size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            rows.score(model)
            fits = torch.cuda.max_memory_allocated(device) <= budget
        except torch.cuda.OutOfMemoryError:
            fits = False
        except RuntimeError as exc:  # cuBLAS and attention kernels say it in their own words
            if "out of memory" not in str(exc).lower():
                raise
            fits = False
        finally:
            del rows
            torch.cuda.empty_cache()
        if not fits:
            break
        chosen = size
        if size >= len(by_length):
            break
    if chosen is None:
        return AUTO_BATCH_SIZES[0], (f"even {AUTO_BATCH_SIZES[0]} of the longest rows take more than "
                                     f"{GPU_MEMORY_SHARE:.0%} of the free GPU memory: the smallest tried")
    return chosen, f"the largest that fits in {GPU_MEMORY_SHARE:.0%} of the free GPU memory, of {', '.join(map(str, AUTO_BATCH_SIZES))}"


def hardware(device: str) -> str:
    """What a batch size chosen by --batch-size auto is good for: the GPU's name and memory, or the
    CPU's name and the torch threads."""
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(torch.device(device))
        return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    return f"{_cpu_name()} CPU, {torch.get_num_threads()} threads"


def _cpu_name() -> str:
    """The CPU's model name where Linux says it (platform.processor() gives only x86_64 there)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()
