"""Scoring with lm-eval: which tasks a recipe names, and where lm-eval finds them.

Looking tasks up costs nothing for a recipe's own task_paths (include_defaults=False);
lm-eval's built-in index (several seconds to build) is consulted only for names the
task_paths do not define.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_recycle.errors import RecipeError
from mergekit_recycle.recipe import Recipe


def task_manager(recipe: Recipe, include_defaults: bool = False):
    """An lm-eval TaskManager over the recipe's task_paths (and lm-eval's own tasks if asked)."""
    from lm_eval.tasks import TaskManager

    include_path = [str(path) for path in recipe.task_paths] or None
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_references(recipe: Recipe) -> List[Tuple[str, str]]:
    """(recipe location, task name) for every search and holdout task."""
    return [
        (f"tasks[{index}].{role}", getattr(task, role))
        for index, task in enumerate(recipe.tasks)
        for role in ("search", "holdout")
    ]


def missing_tasks(recipe: Recipe) -> List[Tuple[str, str]]:
    """The task references that neither task_paths nor lm-eval's own tasks define."""
    references = task_references(recipe)
    known = task_manager(recipe).task_index if recipe.task_paths else {}
    missing = [(location, name) for location, name in references if name not in known]
    if missing:
        known = task_manager(recipe, include_defaults=True).task_index
        missing = [(location, name) for location, name in missing if name not in known]
    return missing


def check_tasks_exist(recipe: Recipe, source: Optional[Path] = None) -> None:
    """Raise RecipeError for the first task lm-eval does not know."""
    missing = missing_tasks(recipe)
    if missing:
        location, name = missing[0]
        where = ", ".join(str(p) for p in recipe.task_paths) or "no task_paths given"
        raise RecipeError(
            source or Path("<recipe>"),
            location,
            f"unknown lm-eval task {name!r}: defined neither in task_paths ({where}) nor by lm-eval",
        )


def quiet_lm_eval() -> None:
    """Silence lm-eval's logging and progress bars (and those of `datasets`) for the rest of
    the process: our callers report progress themselves, and a scoring loop would otherwise
    print thousands of lines."""
    import logging

    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    import tqdm

    class _SilentTqdm(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for module in (lm_eval.models.huggingface, lm_eval.api.model, lm_eval.api.task):
        module.tqdm = _SilentTqdm


class TaskScores(dict):
    """task name -> {metric: value}, plus each task's per-document metrics in `.samples`."""

    samples: Dict[str, Dict[str, List[float]]]


class Scorer:
    """Scores whatever weights sit in one resident model on a fixed set of lm-eval tasks.

    The tasks are built once and the model is wrapped in one HFLM, so that scoring many
    candidates costs only their forward passes: copy new weights into `model` in place
    and call `score()` again.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[str], task_paths: Sequence[Path] = (),
                 include_defaults: bool = False, batch_size: int = 256, device: str = "cpu"):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        quiet_lm_eval()
        manager = TaskManager(include_path=[str(path) for path in task_paths] or None,
                              include_defaults=include_defaults)
        self.tasks = list(tasks)
        self.task_dict = get_task_dict(self.tasks, manager)
        self.model = model
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)

    def score(self, log_samples: bool = False) -> TaskScores:
        """Every task's metrics (lm-eval's `acc,none` becomes `acc`) for the current weights."""
        import lm_eval.evaluator

        results = lm_eval.evaluator.evaluate(
            self.lm, self.task_dict, bootstrap_iters=0, log_samples=log_samples, verbosity="ERROR"
        )
        scores = TaskScores()
        for task in self.tasks:
            scores[task] = {
                key.split(",")[0]: value
                for key, value in results["results"][task].items()
                if key.endswith(",none") and "_stderr" not in key
            }
        scores.samples = {
            task: {metric: [sample[metric] for sample in samples] for metric in scores[task]}
            for task, samples in (results.get("samples") or {}).items()
        }
        return scores
