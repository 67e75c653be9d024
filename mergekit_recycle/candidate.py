"""Evaluating candidates: merge each into the resident model, score it with lm-eval.

`CandidateEvaluator` is the whole interface the search loop sees: give it a batch of merges
and a split, get back one `Outcome` per merge (the scores and the objective, or why it
failed) as each is ready. The resident implementation here runs in this process on one
device, one merge after the other; `ray_evaluator.RayEvaluator` spreads a batch over Ray
actors on several GPUs or machines, each holding a `ResidentEvaluator` of its own.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional, Protocol, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict

from mergekit_recycle.constants import DEFAULT_BATCH_SIZE, UNMEASURED_BATCH_SIZE
from mergekit_recycle.errors import ConfigFileError, LimitOnGroupError, PoolError, RecipeError, one_line
from mergekit_recycle.evaluate import (FewshotError, Scorer, check_chat_templates, check_metrics, metric_name,
                                       named_task_errors, needs_lm_eval_tasks)
from mergekit_recycle.loglikelihoods import choose_batch_size, sliding_window
from mergekit_recycle.pool import Pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import Recipe
from mergekit_recycle.records import Split
from mergekit_recycle.resident_merge import ResidentMerger, load_resident_model

# search: what CMA-ES sees; selection: the search tasks' held-back documents, which choose the
# winner (recipe `selection.holdback`); holdout: the report's tasks, never used to choose.
SPLITS = ("search", "selection", "holdout")
# Splits whose per-document scores are kept: the paired comparisons of selection and report need them.
PER_DOCUMENT_SPLITS = ("selection", "holdout")


class Evaluation(BaseModel):
    """One candidate scored on one split: the metric of each recipe task, and their weighted mean."""

    model_config = ConfigDict(frozen=True)

    scores: Dict[str, float]
    objective: float
    merge_seconds: float
    eval_seconds: float
    # recipe task -> the metric per document, in document order (selection and holdout splits only;
    # a task that is an lm-eval group has none).
    documents: Optional[Dict[str, List[float]]] = None
    # What changed, while scoring it, how candidates are scored (a shortcut that fell back): said once, not journaled.
    notes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What became of one merge of a batch: its evaluation, or the one line that says why it failed."""

    evaluation: Optional[Evaluation] = None
    error: Optional[str] = None
    seconds: float = 0.0  # wall time of the attempt, failed or not
    worker: Optional[int] = None  # the Ray worker that evaluated it (None: this process)


class CandidateEvaluator(Protocol):
    def evaluate_many(self, merges: Sequence[Merge], split: Split) -> Iterator[Tuple[int, Outcome]]:
        """Merge and score each of `merges` on the recipe's `split` tasks; yield (its index, its outcome) as each
        is ready, in any order, exactly once per merge. A failed candidate is an Outcome with an error; an error
        that would fail every candidate alike (ConfigFileError, PoolError) is raised."""


# Errors that say the recipe or the pool is wrong, not the candidate: every candidate would fail alike.
FATAL_ERRORS = (ConfigFileError, PoolError)


def attempt(evaluate: Callable[[Merge, Split], Evaluation], merge: Merge, split: Split) -> Outcome:
    """evaluate(merge, split) as an Outcome: a candidate that fails, or scores NaN, must not end the search."""
    started = time.perf_counter()
    try:
        evaluation = evaluate(merge, split)
    except FATAL_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - mergekit, torch and lm-eval raise many kinds; each ends as one line
        return Outcome(error=one_line(f"{type(exc).__name__}: {exc}"), seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if not all(math.isfinite(value) for value in [*evaluation.scores.values(), evaluation.objective]):
        return Outcome(evaluation=evaluation, error=f"scored NaN: {evaluation.scores}", seconds=seconds)
    return Outcome(evaluation=evaluation, seconds=seconds)


def objective(recipe: Recipe, scores: Dict[str, float]) -> float:
    """The weighted mean of the task scores, with the recipe's task weights."""
    return math.fsum(share * scores[name] for name, share in recipe.shares().items())


def task_name(task, split: Split) -> str:
    """The lm-eval task a recipe task scores on `split`: the selection split is the search task's held-back part."""
    return task.holdout if split == "holdout" else task.search


def one_at_a_time(evaluate: Callable[[Merge, Split], Evaluation], merges: Sequence[Merge],
                  split: Split) -> Iterator[Tuple[int, Outcome]]:
    """A batch evaluated one merge after the other, in order, each outcome yielded as soon as it is known."""
    for index, merge in enumerate(merges):
        yield index, attempt(evaluate, merge, split)


class OneAtATime:
    """A CandidateEvaluator made of an object that evaluates one merge at a time (`evaluate(merge, split)`),
    as evaluators written before batches were."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def evaluate_many(self, merges: Sequence[Merge], split: Split) -> Iterator[Tuple[int, Outcome]]:
        return one_at_a_time(self.evaluator.evaluate, merges, split)

    def __getattr__(self, name: str):
        return getattr(self.evaluator, name)  # describe(), close(), ...


BatchSize = Union[int, Literal["auto"]]  # rows per forward pass, or measured once (--batch-size auto)


class ResidentEvaluator:
    """Merges into one resident model and scores it with task objects and an HFLM built once."""

    def __init__(self, recipe: Recipe, pool: Pool, device: str, source: Path, in_memory: Optional[bool] = None,
                 batch_size: BatchSize = DEFAULT_BATCH_SIZE):
        self.recipe = recipe
        self.source = source
        self.model, tokenizer = load_resident_model(pool, recipe.merge.dtype, device, recipe.merge.trust_remote_code)
        check_chat_templates(recipe, tokenizer, source)
        self.merger = ResidentMerger(pool, self.model, recipe.merge.dtype, in_memory=in_memory)
        include_defaults = needs_lm_eval_tasks(recipe)
        limits = {task.search: task.limit for task in recipe.tasks if task.limit}
        holdback = recipe.selection.holdback
        splits = [split for split in SPLITS if split != "selection" or recipe.selection.enabled]
        # Each lm-eval task prompted as its recipe task says (the recipe allows one way per lm-eval task).
        prompts = {getattr(task, role): task.prompt_settings for task in recipe.tasks for role in ("search", "holdout")}
        try:
            with named_task_errors(recipe, source):
                self.scorers = {
                    split: Scorer(
                        self.model, tokenizer, [task_name(task, split) for task in recipe.tasks], recipe.task_paths,
                        include_defaults=include_defaults, batch_size=UNMEASURED_BATCH_SIZE, device=device,
                        # Only the search is subsampled: the selection and the holdout report score every
                        # document they have.
                        limits=limits if split == "search" else None, seed=recipe.search.seed,
                        holdback=holdback if split != "holdout" else 0.0, part=split, prompts=prompts,
                    )
                    for split in splits
                }
        except LimitOnGroupError as exc:
            index = next(i for i, task in enumerate(recipe.tasks) if task.search == exc.task)
            raise RecipeError(source, f"tasks[{index}].limit", str(exc)) from None
        except FewshotError as exc:
            index = next(i for i, task in enumerate(recipe.tasks) if exc.task in (task.search, task.holdout))
            raise RecipeError(source, f"tasks[{index}].num_fewshot", str(exc)) from None
        self._check_metrics()
        self.batch_size, self.batch_size_reason = batch_size, None
        if batch_size == "auto":
            self.batch_size, self.batch_size_reason = self._choose_batch_size(device)
        for scorer in self.scorers.values():
            scorer.set_batch_size(self.batch_size, measured=batch_size == "auto")
        self._current: Optional[Merge] = None

    def _choose_batch_size(self, device: str) -> Tuple[int, str]:
        """--batch-size auto: (the size, how it was chosen), measured once on the log-likelihood requests
        of every split, with the weights the model was loaded with (timing does not depend on them)."""
        requests = [request for scorer in self.scorers.values() for request in scorer.loglikelihood_requests()]
        search = self.scorers["search"].lm
        return choose_batch_size(self.model, requests, search.max_length, device, search.shared_prefix,
                                 sliding_window(self.model.config))

    def describe(self) -> str:
        megabytes = self.merger.pool.layout.nbytes * len(self.merger.pool.inputs) / 2**20
        where = "kept in memory" if self.merger.in_memory else "streamed from disk for every candidate"
        batch = f"; batch size {self.batch_size}" + (f" (auto: {self.batch_size_reason})" if self.batch_size_reason else "")
        return f"checkpoints: {megabytes:.1f} MiB in all, {where} (see MERGEKIT_RECYCLE_POOL_MEMORY){batch}"

    def evaluate_many(self, merges: Sequence[Merge], split: Split) -> Iterator[Tuple[int, Outcome]]:
        return one_at_a_time(self.evaluate, merges, split)

    def evaluate(self, merge: Merge, split: Split) -> Evaluation:
        """Merge `merge` into the resident model (unless it is there already) and score it on `split`."""
        started = time.perf_counter()
        if merge != self._current:
            self._current = None  # a merge that fails half-way leaves the model in no known state
            self.merger.merge(merge)
            self._current = merge
        merged = time.perf_counter()
        per_document = split in PER_DOCUMENT_SPLITS
        results = self.scorers[split].score(log_samples=per_document)
        scores = {task.name: self._metric(results, task, split) for task in self.recipe.tasks}
        documents = None
        if per_document:
            documents = {task.name: values for task in self.recipe.tasks
                         if (values := results.samples.get(task_name(task, split), {}).get(metric_name(task.metric)))}
        return Evaluation(scores=scores, objective=objective(self.recipe, scores), documents=documents,
                          merge_seconds=merged - started, eval_seconds=time.perf_counter() - merged,
                          notes=tuple(self.scorers[split].new_notes()))

    def _check_metrics(self) -> None:
        """Refuse, before anything is scored, a metric that a search or holdout task does not report
        or that is better when lower (perplexity, say): the objective is maximised."""
        built = {name: task for scorer in self.scorers.values() for name, task in scorer.task_dict.items()}
        check_metrics(self.recipe, built, self.source)

    def _metric(self, results, task, split: Split) -> float:
        name = task_name(task, split)
        reported = results[name]
        metric = metric_name(task.metric)
        if metric not in reported:
            index = self.recipe.tasks.index(task)
            raise RecipeError(self.source, f"tasks[{index}].metric",
                              f"lm-eval task {name!r} reports no metric {task.metric!r} (it reports: {', '.join(sorted(reported))})")
        return float(reported[metric])
