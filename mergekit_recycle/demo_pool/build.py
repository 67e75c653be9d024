"""Building the demo pool: a plan (data) for each size, applied to a folder.

The pool is built like Khalifa et al.'s: one "pretraining" run teaches all three skills,
then several "post-training" runs start from it, each on a skewed mixture at a constant
learning rate. A run keeps what it rehearses and forgets part of what it does not; no run
rehearses both `add` and `shift`, so no checkpoint keeps every skill, and a merge can
recover what each one lost. (`sort` is easy enough that little of it is ever forgotten.)

A build writes into a temporary sibling folder and renames it into place at the end,
so an interrupted or failed build never leaves a half-built pool behind, and an
existing folder is never modified.
"""

import copy
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict

from mergekit_recycle.demo_pool.model import char_tokenizer, save_checkpoint, tiny_llama
from mergekit_recycle.demo_pool.skills import SKILLS
from mergekit_recycle.demo_pool.tasks import SkillTasks, evaluation_examples, skill_tasks, write_tasks
from mergekit_recycle.demo_pool.training import TrainingRun, train
from mergekit_recycle.errors import DemoPoolError, DemoPoolExistsError

MANIFEST = "demo-pool.json"
BASE_NAME = "base"
# Bumped whenever a change to the plan or the training code changes the bytes built.
FORMAT = 3

Report = Callable[[str], None]


class PoolPlan(BaseModel):
    """Everything that decides what a pool of a given size contains, except the seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: str
    hidden_size: int
    layers: int
    pretraining: TrainingRun
    post_training: Tuple[TrainingRun, ...]
    dev_size: int
    test_size: int

    def fingerprint(self) -> str:
        text = json.dumps({"format": FORMAT, "plan": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _post(index: int, add: float, sort: float, shift: float, steps: int, learning_rate: float) -> TrainingRun:
    return TrainingRun(
        name=f"post-{index}",
        mix={"add": add, "sort": sort, "shift": shift},
        steps=steps,
        learning_rate=learning_rate,
        batch_size=32,
        schedule="constant",
    )


def _plan(size: str, post_training: Tuple[TrainingRun, ...], dev_size: int, test_size: int) -> PoolPlan:
    """Both sizes share the model and the pretraining run, which every skill needs in full."""
    pretraining = TrainingRun(name=BASE_NAME, mix={skill: 1.0 for skill in SKILLS}, steps=1500,
                              learning_rate=3e-3, batch_size=64, schedule="cosine")
    return PoolPlan(size=size, hidden_size=32, layers=2, pretraining=pretraining,
                    post_training=post_training, dev_size=dev_size, test_size=test_size)


PLANS: Dict[str, PoolPlan] = {
    "default": _plan(
        "default",
        (
            _post(1, 1, 0, 0, 300, 1e-3),
            _post(2, 4, 1, 0, 200, 1.5e-3),
            _post(3, 0, 1, 0, 400, 1e-3),
            _post(4, 0, 4, 1, 300, 1e-3),
            _post(5, 0, 0, 1, 200, 1.5e-3),
            _post(6, 1, 0, 0, 200, 2e-3),
            _post(7, 1, 1, 0, 300, 1e-3),
            _post(8, 0, 1, 1, 400, 1e-3),
        ),
        dev_size=300,
        test_size=1000,
    ),
    "small": _plan(
        "small",
        tuple(_post(i, *mix, 150, 1e-3) for i, mix in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (0, 4, 1)], 1)),
        dev_size=100,
        test_size=300,
    ),
}
SIZES = tuple(PLANS)


class PoolSummary(BaseModel):
    """What `demo-pool.json` records: how the pool was built and how each checkpoint scores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int
    seed: int
    size: str
    fingerprint: str
    checkpoints: Dict[str, str]
    tasks: List[SkillTasks]
    scores: Dict[str, Dict[str, float]]
    build_seconds: float

    def macro(self, checkpoint: str, split: str) -> float:
        names = [getattr(task, split) for task in self.tasks]
        return sum(self.scores[checkpoint][name] for name in names) / len(names)


def plan_recipe(plan: PoolPlan) -> str:
    """The recipe a pool built from `plan` ships: its post-training checkpoints and tasks."""
    checkpoints = [run.name for run in plan.post_training]
    return recipe_text("toy-recycle", checkpoints, skill_tasks(), budget=200)


def recipe_text(name: str, checkpoints: List[str], tasks: List[SkillTasks], budget: int) -> str:
    """A recipe over the post-training checkpoints, with paths relative to the pool folder."""
    lines = [f"name: {name}", "pool:"]
    lines += [f"  - path: {checkpoint}" for checkpoint in checkpoints]
    lines += ["base: null", "tasks:"]
    for skill, dev, test in tasks:
        lines += [f"  - name: {skill}", f"    search: {dev}", f"    holdout: {test}", "    metric: acc", "    weight: 1.0"]
    lines += [
        "task_paths: [tasks]",
        f"search: {{budget: {budget}, population: null, sigma0: 0.25, seed: 0, scale: 1.0}}",
        "merge: {dtype: float32, device: auto}",
        f"output: {{run_dir: runs/{name}, hub_repo: null, private: true}}",
    ]
    return "\n".join(lines) + "\n"


def read_summary(directory: Path) -> Optional[PoolSummary]:
    """The summary of the pool in `directory`, or None when it holds none."""
    path = Path(directory) / MANIFEST
    try:
        if not path.is_file():
            return None
        return PoolSummary.model_validate_json(path.read_text())
    except OSError as exc:
        raise DemoPoolError(directory, f"cannot read {MANIFEST} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise DemoPoolExistsError(directory, f"{MANIFEST} is unreadable ({exc.__class__.__name__}); delete the folder to rebuild") from None


def _pool_files(summary: PoolSummary) -> List[str]:
    """The files a complete pool holds, relative to its folder."""
    files = ["recipe.yaml", "tasks/toy_data.py"]
    files += [f"{name}/{file}" for name in summary.checkpoints for file in ("model.safetensors", "config.json", "tokenizer.json")]
    files += [f"tasks/{name}.{ext}" for task in summary.tasks for name in (task.search, task.holdout) for ext in ("yaml", "jsonl")]
    return files


def _existing_pool(directory: Path, seed: int, plan: PoolPlan) -> Optional[PoolSummary]:
    """The matching, complete pool already in `directory`, or None when `directory` is
    missing or empty; raise for anything else, before any training starts."""
    try:
        if not directory.exists():
            return None
        if not directory.is_dir():
            raise DemoPoolExistsError(directory, "exists and is not a folder")
        summary = read_summary(directory)
        if summary is None:
            if any(directory.iterdir()):
                raise DemoPoolExistsError(directory, "is not empty and holds no demo pool; choose an empty or new folder")
            if not os.access(directory, os.W_OK):
                raise DemoPoolError(directory, "cannot write here (permission denied)")
            return None
    except DemoPoolError:
        raise
    except OSError as exc:
        raise DemoPoolError(directory, f"cannot read this folder ({exc.strerror or exc})") from None
    if (summary.seed, summary.size) != (seed, plan.size):
        raise DemoPoolExistsError(
            directory,
            f"already holds a demo pool built with --seed {summary.seed} --size {summary.size}; "
            f"choose another folder or delete this one to build --seed {seed} --size {plan.size}",
        )
    if summary.fingerprint != plan.fingerprint():
        raise DemoPoolExistsError(directory, "holds a demo pool built by another version of mergekit-recycle; delete it to rebuild")
    missing = [file for file in _pool_files(summary) if not (directory / file).is_file()]
    if missing:
        raise DemoPoolExistsError(directory, f"holds an incomplete demo pool ({missing[0]} is missing); delete it to rebuild")
    return summary


def _workspace(directory: Path) -> Path:
    """A fresh temporary folder next to `directory`, proving that we can write there."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    except OSError as exc:
        raise DemoPoolError(directory, f"cannot write here ({exc.strerror or exc})") from None
    # mkdtemp makes the folder private; the pool should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    workspace.chmod(0o777 & ~umask)
    return workspace


def _train_pool(workspace: Path, seed: int, plan: PoolPlan, evaluation_questions: frozenset, report: Report) -> Dict[str, str]:
    tokenizer = char_tokenizer()
    runs = (plan.pretraining,) + plan.post_training
    base = tiny_llama(tokenizer, seed=seed, hidden_size=plan.hidden_size, layers=plan.layers)
    descriptions = {}
    for index, run in enumerate(runs):
        model = base if run is plan.pretraining else copy.deepcopy(base)
        started = time.perf_counter()
        label = f"[{index + 1}/{len(runs)}] {run.name} ({run.describe()})"

        def progress(step: int, total: int, loss: float) -> None:
            if step % max(1, total // 4) == 0 or step == total:
                report(f"{label}: step {step}/{total}, loss {loss:.3f}")

        train(model, tokenizer, run, seed=seed * 1009 + index, exclude=evaluation_questions, progress=progress)
        save_checkpoint(model, tokenizer, workspace / run.name)
        report(f"{label}: done in {time.perf_counter() - started:.1f} s")
        descriptions[run.name] = run.describe()
    return descriptions


def _score_pool(workspace: Path, checkpoints: List[str], tasks: List[SkillTasks], report: Report) -> Dict[str, Dict[str, float]]:
    """Every checkpoint's accuracy on every dev and test task, scored by lm-eval."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_recycle.evaluate import Scorer

    first = workspace / checkpoints[0]
    model = AutoModelForCausalLM.from_pretrained(first).eval()
    names = [name for task in tasks for name in (task.search, task.holdout)]
    scorer = Scorer(model, AutoTokenizer.from_pretrained(first), names, [workspace / "tasks"])
    scores = {}
    for checkpoint in checkpoints:
        model.load_state_dict(load_file(workspace / checkpoint / "model.safetensors"))
        scores[checkpoint] = {name: metrics["acc"] for name, metrics in scorer.score().items()}
        report(f"scored {checkpoint}")
    return scores


def build_pool(directory: Path, seed: int = 0, size: Union[str, PoolPlan] = "default",
               report: Report = lambda line: None) -> PoolSummary:
    """Build the demo pool of `size` (a name in PLANS, or a plan of your own) from `seed` in
    `directory` and return its summary; a no-op when `directory` already holds that pool.
    `report` receives progress lines."""
    from transformers.utils import logging as transformers_logging

    if Path(directory).name in ("", ".", "..") or Path(directory).is_symlink() or os.path.ismount(directory):
        raise DemoPoolError(directory, "give the pool a folder of its own (not '.', '..', a link or a mount point)")
    directory = Path(os.path.abspath(directory))
    plan = PLANS[size] if isinstance(size, str) else size
    existing = _existing_pool(directory, seed, plan)
    if existing is not None:
        report(f"{directory} already holds this pool (--seed {seed} --size {plan.size}); nothing to do")
        return existing
    workspace = _workspace(directory)
    try:
        transformers_logging.disable_progress_bar()
        started = time.perf_counter()
        examples = evaluation_examples(seed, plan.dev_size, plan.test_size)
        questions = frozenset(row["question"] for splits in examples.values() for rows in splits.values() for row in rows)
        descriptions = _train_pool(workspace, seed, plan, questions, report)
        tasks = write_tasks(workspace / "tasks", examples)
        scores = _score_pool(workspace, list(descriptions), tasks, report)
        (workspace / "recipe.yaml").write_text(plan_recipe(plan))
        summary = PoolSummary(
            format=FORMAT, seed=seed, size=plan.size, fingerprint=plan.fingerprint(), checkpoints=descriptions,
            tasks=tasks, scores=scores, build_seconds=round(time.perf_counter() - started, 1),
        )
        (workspace / MANIFEST).write_text(summary.model_dump_json(indent=2) + "\n")
        return _move_into_place(workspace, directory, seed, plan, summary)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def _move_into_place(workspace: Path, directory: Path, seed: int, plan: PoolPlan, summary: PoolSummary) -> PoolSummary:
    """Rename the finished pool onto `directory` (missing or empty: rename replaces an empty
    folder in one step). If another build of the same pool got there first, use that one."""
    try:
        os.replace(workspace, directory)
        return summary
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            existing = _existing_pool(directory, seed, plan)
            if existing is not None:
                return existing
        raise DemoPoolError(directory, f"cannot move the finished pool into place ({exc.strerror or exc})") from None


def summary_table(summary: PoolSummary) -> str:
    """Each checkpoint's dev/test accuracy per skill and the macro-average, in percent."""
    headers = ["checkpoint"] + [task.skill for task in summary.tasks] + ["macro"]
    rows = []
    for checkpoint in summary.checkpoints:
        scores = summary.scores[checkpoint]
        cells = [f"{100 * scores[task.search]:5.1f} /{100 * scores[task.holdout]:5.1f}" for task in summary.tasks]
        cells.append(f"{100 * summary.macro(checkpoint, 'search'):5.1f} /{100 * summary.macro(checkpoint, 'holdout'):5.1f}")
        rows.append([checkpoint] + cells)
    widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
    lines = ["accuracy % (dev / test)"]
    lines.append("  ".join(header.ljust(width) for header, width in zip(headers, widths)))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.append("")
    lines += [f"{checkpoint}: {description}" for checkpoint, description in summary.checkpoints.items()]
    return "\n".join(lines)
