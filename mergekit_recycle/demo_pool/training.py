"""Training a demo checkpoint: next-token loss on the answers of a skill mixture.

Deterministic by construction: the data stream, the initial weights and every random
draw of the optimizer come from the run's seed, and the run uses one CPU thread (so the
order of floating-point sums does not depend on the number of cores). A seed gives the
same bytes on the same machine and torch build; another CPU's vector instructions may
round differently.
"""

import math
import random
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_recycle.demo_pool.skills import SKILLS

# Called with (steps done, steps in total, current loss).
ProgressCallback = Callable[[int, int, float], None]


SCHEDULES = ("cosine", "constant")


class TrainingRun(BaseModel):
    """One training run: where it starts, what it sees, how fast it moves and when it is saved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    mix: Dict[str, float] = Field(description="relative share of each skill in the data")
    steps: int
    learning_rate: float
    batch_size: int
    schedule: str = Field(description="'cosine' decays to zero; 'constant' keeps the rate")
    warmup: float = 0.1
    # Fields added after the first plans: at their defaults they leave a plan's fingerprint unchanged.
    start: Optional[str] = Field(
        default=None,
        description="the checkpoint (of an earlier run) this run starts from; none: a freshly "
        "initialised model for a plan's first run, that run's checkpoint for every other run",
    )
    saves: Tuple[int, ...] = Field(
        default=(),
        description="steps after which the run is saved, as checkpoints '<name>-<step>'; "
        "none: one checkpoint '<name>' at the end",
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainingRun":
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if not any(self.mix.get(skill, 0) > 0 for skill in SKILLS) or set(self.mix) - set(SKILLS):
            raise ValueError(f"mix must give some of {', '.join(SKILLS)} (and nothing else) a positive share")
        if self.saves and (list(self.saves) != sorted(set(self.saves)) or self.saves[0] < 1 or self.saves[-1] != self.steps):
            raise ValueError("saves must be increasing steps from 1 up to the last step, which it must include")
        return self

    def checkpoints(self) -> Tuple[str, ...]:
        """The names of the checkpoints this run saves, in order."""
        return tuple(f"{self.name}-{step}" for step in self.saves) if self.saves else (self.name,)

    def describe(self) -> str:
        mix = ":".join(f"{self.mix.get(skill, 0):g}" for skill in SKILLS)
        text = f"mix {'/'.join(SKILLS)} {mix}, {self.steps} steps, lr {self.learning_rate:g} {self.schedule}"
        return text + (f", from {self.start}" if self.start else "")

    def describe_checkpoint(self, checkpoint: str) -> str:
        """What one of this run's checkpoints is."""
        if not self.saves:
            return self.describe()
        step = self.saves[self.checkpoints().index(checkpoint)]
        return f"step {step} of run {self.name} ({self.describe()})"


def training_batches(run: TrainingRun, tokenizer, rng: random.Random, exclude: frozenset) -> Iterable[Tuple[list, list]]:
    """Endless (input ids, labels) batches; the loss sees answers only, never questions."""
    vocab = tokenizer.get_vocab()
    skills = [skill for skill in SKILLS if run.mix.get(skill, 0) > 0]
    weights = [run.mix[skill] for skill in skills]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        ids, labels = [], []
        for skill in rng.choices(skills, weights, k=run.batch_size):
            question, answer, _ = SKILLS[skill](rng)
            while question in exclude:
                question, answer, _ = SKILLS[skill](rng)
            q = [vocab[c] for c in question]
            a = [vocab[c] for c in answer] + [eos]
            ids.append([bos] + q + a)
            labels.append([-100] * (1 + len(q)) + a)
        yield ids, labels


def _pad(rows: List[list], value: int, width: int) -> List[list]:
    return [row + [value] * (width - len(row)) for row in rows]


def train(model, tokenizer, run: TrainingRun, seed: int, exclude: frozenset = frozenset(),
          progress: Optional[ProgressCallback] = None):
    """Train `model` in place on `run`'s data, which never contains a question in `exclude`."""
    import torch

    previous_threads = torch.get_num_threads()
    previous_attention = model.config._attn_implementation
    torch.set_num_threads(1)
    # For a model this small, eager attention trains about 12% faster than SDPA on a CPU.
    model.set_attn_implementation("eager")
    try:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=run.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
        warmup = max(1, int(run.warmup * run.steps))

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup)
            if run.schedule == "constant":
                return ramp
            return ramp * 0.5 * (1 + math.cos(math.pi * step / run.steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        batches = training_batches(run, tokenizer, rng, exclude)
        for step in range(run.steps):
            ids, labels = next(batches)
            width = max(map(len, ids))
            input_ids = torch.tensor(_pad(ids, tokenizer.pad_token_id, width))
            targets = torch.tensor(_pad(labels, -100, width))
            # Padding sits at the right end, where causal attention keeps it from every real
            # token, and its labels are -100: no attention mask is needed.
            logits = model(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if progress is not None:
                progress(step + 1, run.steps, loss.item())
        model.eval()
        return model
    finally:
        torch.set_num_threads(previous_threads)
        model.set_attn_implementation(previous_attention)
