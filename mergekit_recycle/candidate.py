"""Evaluating one candidate: merge it into the resident model, score it with lm-eval.

`CandidateEvaluator` is the whole interface the search loop sees: give it a merge and a
split, get back per-task scores and the objective. The resident implementation here runs
in this process on one device; spreading a generation over several GPUs or machines (Ray)
means another implementation of the same method, not a change to the search.
"""

import math
import time
from pathlib import Path
from typing import Dict, List, Literal, Optional, Protocol

from pydantic import BaseModel, ConfigDict

from mergekit_recycle.constants import DEFAULT_BATCH_SIZE
from mergekit_recycle.errors import LimitOnGroupError, RecipeError
from mergekit_recycle.evaluate import Scorer, check_metrics, metric_name, named_task_errors, needs_lm_eval_tasks
from mergekit_recycle.pool import Pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import Recipe
from mergekit_recycle.resident_merge import ResidentMerger, load_resident_model

Split = Literal["search", "selection", "holdout"]

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


class CandidateEvaluator(Protocol):
    def evaluate(self, merge: Merge, split: Split) -> Evaluation:
        """Merge `merge` and score it on the recipe's `split` tasks; raise if either fails."""


def objective(recipe: Recipe, scores: Dict[str, float]) -> float:
    """The weighted mean of the task scores, with the recipe's task weights."""
    return math.fsum(share * scores[name] for name, share in recipe.shares().items())


def task_name(task, split: Split) -> str:
    """The lm-eval task a recipe task scores on `split`: the selection split is the search task's held-back part."""
    return task.holdout if split == "holdout" else task.search


class ResidentEvaluator:
    """Merges into one resident model and scores it with task objects and an HFLM built once."""

    def __init__(self, recipe: Recipe, pool: Pool, device: str, source: Path, in_memory: Optional[bool] = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.recipe = recipe
        self.source = source
        self.model, tokenizer = load_resident_model(pool, recipe.merge.dtype, device, recipe.merge.trust_remote_code)
        self.merger = ResidentMerger(pool, self.model, recipe.merge.dtype, in_memory=in_memory)
        include_defaults = needs_lm_eval_tasks(recipe)
        limits = {task.search: task.limit for task in recipe.tasks if task.limit}
        holdback = recipe.selection.holdback
        splits = [split for split in SPLITS if split != "selection" or recipe.selection.enabled]
        try:
            with named_task_errors(recipe, source):
                self.scorers = {
                    split: Scorer(
                        self.model, tokenizer, [task_name(task, split) for task in recipe.tasks], recipe.task_paths,
                        include_defaults=include_defaults, batch_size=batch_size, device=device,
                        # Only the search is subsampled: the selection and the holdout report score every
                        # document they have.
                        limits=limits if split == "search" else None, seed=recipe.search.seed,
                        holdback=holdback if split != "holdout" else 0.0, part=split,
                    )
                    for split in splits
                }
        except LimitOnGroupError as exc:
            index = next(i for i, task in enumerate(recipe.tasks) if task.search == exc.task)
            raise RecipeError(source, f"tasks[{index}].limit", str(exc)) from None
        self._check_metrics()
        self._current: Optional[Merge] = None

    def describe(self) -> str:
        megabytes = self.merger.pool.layout.nbytes * len(self.merger.pool.inputs) / 2**20
        where = "kept in memory" if self.merger.in_memory else "streamed from disk for every candidate"
        return f"checkpoints: {megabytes:.1f} MiB in all, {where} (see MERGEKIT_RECYCLE_POOL_MEMORY)"

    def evaluate(self, merge: Merge, split: Split) -> Evaluation:
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
                          merge_seconds=merged - started, eval_seconds=time.perf_counter() - merged)

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
