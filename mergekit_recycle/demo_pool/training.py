"""Training a demo checkpoint: next-token loss on the answers of a skill mixture.

Deterministic by construction: the data stream, the initial weights and every random
draw of the optimizer come from the run's seed, and the run uses one CPU thread (so the
order of floating-point sums does not depend on the number of cores). In a process started
with build.PINNED_ENVIRONMENT (as a build's training process is), a seed gives the same bytes
on every x86-64 CPU with the same torch build; elsewhere the CPU's vector instructions and
MKL's kernels may round differently.
"""

import math
import random
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_recycle.demo_pool.skills import SKILLS, make_examples

# Called with (steps done, steps in total, current loss).
ProgressCallback = Callable[[int, int, float], None]


SCHEDULES = ("cosine", "constant")
# Questions per skill in the probe that decides whether a run has learnt its skills (UntilLearnt):
# enough that a skill that has appeared (well above the 25% of chance) is told from one that has not.
PROBE_QUESTIONS = 200


class UntilLearnt(BaseModel):
    """A build-time rule for a constant-rate run: it goes on until every skill of its mix is learnt,
    then anneals. A late skill (`shift`) appears abruptly, after a number of steps that depends on
    the seed and on the CPU's rounding; a fixed schedule that stops or decays too early leaves it out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(description="probe accuracy (0-1) that every skill of the run's mix must reach")
    every: int = Field(description="steps between probes, from the run's `steps` (the first probe) on")
    max_steps: int = Field(description="the last probe: a skill still below the threshold there fails the build")
    anneal: int = Field(description="steps of cosine decay to zero after the probe that passed")

    @model_validator(mode="after")
    def _check(self) -> "UntilLearnt":
        if not 0 <= self.threshold <= 1 or self.every < 1 or self.anneal < 0:
            raise ValueError("until_learnt needs a threshold in [0, 1], every >= 1 and anneal >= 0")
        return self

    def describe(self, first: int) -> str:
        """The rule in words, for a run whose first probe is at step `first`."""
        return (f" until every skill reaches {100 * self.threshold:g}% on a probe (every {self.every} steps "
                f"from {first}, at most {self.max_steps}), then {self.anneal} steps cosine")


class SkillsNotLearnt(ValueError):
    """A run with an UntilLearnt rule reached its last probe with a skill below the threshold."""


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
    until_learnt: Optional[UntilLearnt] = Field(
        default=None, description="for a constant-rate run: go on past `steps` until its skills are learnt, then anneal"
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
        rule = self.until_learnt
        if rule is not None and (self.schedule != "constant" or self.saves or rule.max_steps < self.steps):
            raise ValueError("until_learnt needs a constant schedule, no saves, and max_steps >= steps")
        return self

    def skills(self) -> List[str]:
        """The skills this run's data holds."""
        return [skill for skill in SKILLS if self.mix.get(skill, 0) > 0]

    def checkpoints(self) -> Tuple[str, ...]:
        """The names of the checkpoints this run saves, in order."""
        return tuple(f"{self.name}-{step}" for step in self.saves) if self.saves else (self.name,)

    def describe(self) -> str:
        mix = ":".join(f"{self.mix.get(skill, 0):g}" for skill in SKILLS)
        text = f"mix {'/'.join(SKILLS)} {mix}, {self.steps} steps, lr {self.learning_rate:g} {self.schedule}"
        if self.until_learnt is not None:
            text = f"mix {'/'.join(SKILLS)} {mix}, lr {self.learning_rate:g} constant" + self.until_learnt.describe(self.steps)
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
    skills = run.skills()
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


def probe_examples(run: TrainingRun, seed: int, exclude: frozenset) -> Dict[str, List[dict]]:
    """PROBE_QUESTIONS multiple-choice examples of each skill of `run`, drawn from its training
    distribution with their own random stream: never a question in `exclude` (the tasks')."""
    rng = random.Random(f"probe-{seed}")
    return {skill: make_examples(skill, PROBE_QUESTIONS, rng, exclude) for skill in run.skills()}


def probe_accuracy(model, tokenizer, examples: Dict[str, List[dict]]) -> Dict[str, float]:
    """Per skill, the share of `examples` whose answer has the highest summed log-likelihood of
    the choices after the question: lm-eval's multiple-choice `acc`, computed here in one batch a skill."""
    import torch

    vocab = tokenizer.get_vocab()
    was_training = model.training
    model.eval()
    accuracy = {}
    with torch.no_grad():
        for skill, rows in examples.items():
            sequences, spans = [], []
            for row in rows:
                question = [tokenizer.bos_token_id] + [vocab[c] for c in row["question"]]
                for choice in row["choices"]:
                    sequences.append(question + [vocab[c] for c in choice])
                    spans.append((len(question), len(sequences[-1])))
            ids = torch.tensor(_pad(sequences, tokenizer.pad_token_id, max(map(len, sequences))))
            log_probs = torch.log_softmax(model(input_ids=ids).logits, dim=-1)
            scores = torch.tensor([
                log_probs[k, start - 1 : end - 1].gather(-1, ids[k, start:end, None]).sum().item()
                for k, (start, end) in enumerate(spans)
            ])
            chosen = scores.view(len(rows), -1).argmax(dim=1)
            accuracy[skill] = float((chosen == torch.tensor([row["answer"] for row in rows])).float().mean())
    model.train(was_training)
    return accuracy


def _probe(model, tokenizer, run: TrainingRun, probe: Dict[str, List[dict]], step: int, log: Callable[[str], None]) -> Optional[int]:
    """`step` when every skill of `run` has reached its rule's threshold on `probe`, None while
    some has not; raise SkillsNotLearnt at the rule's last probe."""
    rule = run.until_learnt
    accuracy = probe_accuracy(model, tokenizer, probe)
    scores = ", ".join(f"{skill} {100 * value:.1f}%" for skill, value in accuracy.items())
    missing = [skill for skill, value in accuracy.items() if value < rule.threshold]
    if not missing:
        log(f"step {step}: probe {scores}: every skill learnt; annealing for {rule.anneal} steps")
        return step
    if step + rule.every > rule.max_steps:
        raise SkillsNotLearnt(f"run {run.name} did not learn {', '.join(missing)} in {step} steps (probe {scores}; "
                              f"needs {100 * rule.threshold:g}%): this seed needs a longer or different plan")
    log(f"step {step}: probe {scores}: not yet")
    return None


def train(model, tokenizer, run: TrainingRun, seed: int, exclude: frozenset = frozenset(),
          progress: Optional[ProgressCallback] = None, log: Callable[[str], None] = lambda line: None):
    """Train `model` in place on `run`'s data, which never contains a question in `exclude`.

    A run with an UntilLearnt rule probes its skills (on questions outside `exclude` too) and
    says what it found through `log`; it raises SkillsNotLearnt when its last probe fails."""
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
        rule = run.until_learnt
        probe = probe_examples(run, seed, exclude) if rule is not None else None
        # Under a rule the length is known only once the skills are learnt: until then, the longest it may be.
        total = run.steps if rule is None else rule.max_steps + rule.anneal
        learnt_at = None  # the step after which a rule's run anneals

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup)
            if learnt_at is not None:
                return 0.5 * (1 + math.cos(math.pi * (step - learnt_at) / max(1, rule.anneal)))
            if run.schedule == "constant":
                return ramp
            return ramp * 0.5 * (1 + math.cos(math.pi * step / run.steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        batches = training_batches(run, tokenizer, rng, exclude)
        step = 0
        while step < total:
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
            step += 1
            if rule is not None and learnt_at is None and step >= run.steps and (step - run.steps) % rule.every == 0:
                # Decided before scheduler.step(), which sets the next step's rate from it.
                learnt_at = _probe(model, tokenizer, run, probe, step, log)
                if learnt_at is not None:
                    total = step + rule.anneal
            scheduler.step()
            if progress is not None:
                progress(step, total, loss.item())
        model.eval()
        return model
    finally:
        torch.set_num_threads(previous_threads)
        model.set_attn_implementation(previous_attention)
