"""Scoring with lm-eval: which tasks a recipe names, and where lm-eval finds them.

Looking tasks up costs nothing for a recipe's own task_paths (include_defaults=False);
lm-eval's built-in index (several seconds to build) is consulted only for names the
task_paths do not define.
"""

from pathlib import Path
from typing import List, Optional, Tuple

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
