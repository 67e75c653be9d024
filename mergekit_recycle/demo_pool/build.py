"""Building the demo pool: a plan (data) for each design and size, applied to a folder.

The default design, `forgetting`, is built like Khalifa et al.'s pool: one "pretraining" run
teaches all three skills (it goes on until a probe finds every skill learnt: LEARNT_BASE), then several "post-training" runs start from it, each on a skewed
mixture at a constant learning rate. A run keeps what it rehearses and forgets part of what it
does not; no run rehearses both `add` and `shift`, so no checkpoint keeps every skill, and a
merge can recover what each one lost. (`sort` is easy enough that little of it is ever forgotten.)

The other designs (DESIGNS) give pools of other characters: complementary `experts` from a weak
base, the checkpoints of one training `trajectory` and its annealed ends, a `dominant` checkpoint
that no merge improves on, a forgetting pool with one `broken` (diverged) checkpoint, `close`
checkpoints that tie (little headroom), and the forgetting plan on a tied-embedding `qwen2` model. Each design's docstring below says what it holds.

A build writes into a temporary sibling folder and renames it into place at the end,
so an interrupted or failed build never leaves a half-built pool behind, and an
existing folder is never modified.

The training runs in a child process started with PINNED_ENVIRONMENT, which makes a seed give
the same bytes on any x86-64 CPU (see there); `content_fingerprint` hashes what was built.
"""

import copy
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergekit_recycle.demo_pool.model import ARCHITECTURES, char_tokenizer, save_checkpoint, tiny_model
from mergekit_recycle.demo_pool.skills import SKILLS
from mergekit_recycle.demo_pool.tasks import SkillTasks, evaluation_examples, skill_tasks, write_tasks
from mergekit_recycle.demo_pool.training import SkillsNotLearnt, TrainingRun, UntilLearnt, train
from mergekit_recycle.errors import DemoPoolError, DemoPoolExistsError

MANIFEST = "demo-pool.json"
BASE_NAME = "base"
# Bumped whenever a change to the plan or the training code changes the bytes built.
# 4: training pinned to PINNED_ENVIRONMENT. 5: the forgetting base trains until it has learnt every skill.
FORMAT = 5
# The environment the training process starts with: what makes a seed give the same bytes on
# every x86-64 CPU, not only on the machine that built it. torch picks its vectorised kernels
# (AVX512, AVX2, ...) by the CPU, and their sums and transcendental functions round
# differently; `default` is the same scalar code everywhere. MKL picks its matrix-product
# kernels by CPU model and vendor; COMPATIBLE is its conditional numerical reproducibility mode,
# the same code path on every Intel or compatible CPU. One thread fixes the order of every
# reduction. Both libraries read these once, at their first use: hence a fresh process.
PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

Report = Callable[[str], None]


class PoolPlan(BaseModel):
    """Everything that decides what a pool of a given design and size contains, except the seed.

    The first run (`pretraining`) starts from a freshly initialised model; each later run starts
    from the checkpoint its `start` names (by default the pretraining run's). The recipe's pool is
    every checkpoint the post-training runs save, in order.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: str
    hidden_size: int
    layers: int
    pretraining: TrainingRun
    post_training: Tuple[TrainingRun, ...]
    dev_size: int
    test_size: int
    # Fields added after the first plans: at their defaults they leave the fingerprint unchanged.
    design: str = "forgetting"
    architecture: str = Field(default="llama", description="a key of model.ARCHITECTURES")

    @model_validator(mode="after")
    def _check(self) -> "PoolPlan":
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        if self.pretraining.start is not None:
            raise ValueError("the pretraining run starts from a fresh model: it takes no start")
        if not self.post_training:
            raise ValueError("a plan needs at least one post-training run (the pool)")
        saved = list(self.pretraining.checkpoints())
        for run in self.post_training:
            if run.start is not None and run.start not in saved:
                raise ValueError(f"run {run.name} starts from {run.start}, which no earlier run saves")
            saved += run.checkpoints()
        if len(set(saved)) != len(saved) or any(name in ("tasks", "") or "/" in name for name in saved):
            raise ValueError("checkpoint names must be distinct folder names (and not 'tasks')")
        return self

    @property
    def runs(self) -> Tuple[TrainingRun, ...]:
        return (self.pretraining,) + self.post_training

    def checkpoints(self) -> Tuple[str, ...]:
        """Every checkpoint the build saves, in order."""
        return tuple(name for run in self.runs for name in run.checkpoints())

    def pool(self) -> Tuple[str, ...]:
        """The checkpoints the recipe merges: those of the post-training runs."""
        return tuple(name for run in self.post_training for name in run.checkpoints())

    def fingerprint(self) -> str:
        data = _dump_without_defaults(self, ("design", "architecture"))
        later = ("start", "saves", "until_learnt")
        data["pretraining"] = _dump_without_defaults(self.pretraining, later)
        data["post_training"] = [_dump_without_defaults(run, later) for run in self.post_training]
        text = json.dumps({"format": FORMAT, "plan": data}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dump_without_defaults(model: BaseModel, later_fields: Tuple[str, ...]) -> dict:
    """`model` as JSON data, leaving out the fields added after a plan's first version while they
    hold their defaults: plans made before those fields keep their fingerprints."""
    data = model.model_dump(mode="json")
    for field in later_fields:
        if getattr(model, field) == type(model).model_fields[field].default:
            del data[field]
    return data


def _run(name: str, add: float, sort: float, shift: float, steps: int, learning_rate: float, batch_size: int = 32,
         schedule: str = "constant", **more) -> TrainingRun:
    return TrainingRun(name=name, mix={"add": add, "sort": sort, "shift": shift}, steps=steps,
                       learning_rate=learning_rate, batch_size=batch_size, schedule=schedule, **more)


def _post(index: int, add: float, sort: float, shift: float, steps: int, learning_rate: float) -> TrainingRun:
    return _run(f"post-{index}", add, sort, shift, steps, learning_rate)


def _pretraining(steps: int, schedule: str = "constant", mix: Tuple[float, float, float] = (1, 1, 1), **more) -> TrainingRun:
    """A run on every skill (an even mix unless told otherwise), from a fresh model: `base`."""
    return _run(BASE_NAME, *mix, steps, 3e-3, batch_size=64, schedule=schedule, **more)


def _learnt_pretraining() -> TrainingRun:
    """The forgetting plans' base: a constant rate until a probe finds every skill learnt, then
    annealed (LEARNT_BASE). `shift` appears abruptly, after a number of steps that depends on the
    seed and on rounding (under the pinned numerics, near 700-800 steps at this rate for seeds 0
    and 1): a fixed cosine schedule of 1,500 steps had decayed too far by then on seed 0, whose
    base never learnt it."""
    return _pretraining(LEARNT_BASE_FIRST_PROBE, warmup=LEARNT_BASE_WARMUP / LEARNT_BASE_FIRST_PROBE, until_learnt=LEARNT_BASE)


# Probe from step 500 (after a warm-up of 100) every 250 steps; 60% is far above chance (25%), and
# a skill that has appeared passes it within a few hundred steps (`add`, the slowest after `shift`,
# is near 70% at 1,000 steps); the anneal then takes every skill to 95-100%.
LEARNT_BASE_FIRST_PROBE = 500
LEARNT_BASE_WARMUP = 100
LEARNT_BASE = UntilLearnt(threshold=0.6, every=250, max_steps=4000, anneal=750)


SIZE_QUESTIONS = {"default": (300, 1000), "small": (100, 300)}


def _plan(size: str, post_training: Tuple[TrainingRun, ...], pretraining: Optional[TrainingRun] = None,
          hidden_size: int = 32, **more) -> PoolPlan:
    """The forgetting plans' model and pretraining run (which every skill needs in full) unless
    told otherwise, and the size's number of questions."""
    dev_size, test_size = SIZE_QUESTIONS[size]
    return PoolPlan(size=size, hidden_size=hidden_size, layers=2, pretraining=pretraining or _learnt_pretraining(),
                    post_training=post_training, dev_size=dev_size, test_size=test_size, **more)


# forgetting: Khalifa et al.'s pool (see the module's docstring). Each post-training run keeps
# what it rehearses and forgets part of the rest; no checkpoint has every skill.
# The rates: from LEARNT_BASE's annealed base, the earlier rates (1e-3 to 2e-3, and 1e-3 at the
# small size) forget too little (a run that never rehearses `add` keeps 98% of it: no headroom);
# two to three times those, each run loses 10-75 points of what it skips.
SMALL_POST_RATE = 3e-3
FORGETTING_RUNS = {
    "default": (
        _post(1, 1, 0, 0, 300, 2e-3),
        _post(2, 4, 1, 0, 200, 3e-3),
        _post(3, 0, 1, 0, 400, 2e-3),
        _post(4, 0, 4, 1, 300, 2e-3),
        _post(5, 0, 0, 1, 200, 3e-3),
        _post(6, 1, 0, 0, 200, 4e-3),
        _post(7, 1, 1, 0, 300, 2e-3),
        _post(8, 0, 1, 1, 400, 2e-3),
    ),
    "small": tuple(_post(i, *mix, 150, SMALL_POST_RATE) for i, mix in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (0, 4, 1)], 1)),
}


def _forgetting(size: str) -> PoolPlan:
    return _plan(size, FORGETTING_RUNS[size])


def _experts(size: str) -> PoolPlan:
    """experts: a base trained only part of the way (1,000 steps at a constant rate, not
    annealed: weaker than the forgetting design's, mostly at `add`), then experts fine-tuned from
    it on one skill each, two per skill at different learning rates (one at the small size).
    Each expert is best at its own skill and forgets much of the others; averages of them
    combine the skills and beat every expert, and the base.

    The base cannot be much weaker: a weight average does not create a skill that the experts'
    common ancestor lacked. `shift` appears abruptly (near 850-900 steps of this run); experts
    from a base without it lose it again in any average (a merge of an `add` and a `shift`
    expert then scores no better than the base), and what an `add` expert adds is halved."""
    base = _pretraining(EXPERTS_BASE_STEPS, schedule="constant", mix=EXPERTS_BASE_MIX)
    steps, rates = EXPERTS[size]
    runs = tuple(
        _run(f"{skill}-{index}", *(float(other == skill) for other in SKILLS), steps, rate)
        for index, rate in enumerate(rates, 1) for skill in SKILLS
    )
    return _plan(size, runs, pretraining=base, design="experts")


EXPERTS_BASE_STEPS = 1000
EXPERTS_BASE_MIX = (1, 1, 1)
# (steps of each expert, the learning rate of each expert of a skill)
EXPERTS = {"default": (300, (1e-3, 1.5e-3)), "small": (200, (1e-3,))}


def _trajectory(size: str) -> PoolPlan:
    """trajectory: one constant-learning-rate run on every skill, from a short warm start (`base`,
    not in the pool), saved every 200 steps (150 at the small size), and cosine-annealed branches
    from two of those checkpoints: neighbours close in weight space, as along a real training
    run. Early checkpoints come before `shift` appears, later ones improve noisily (a constant
    rate), and the later annealed branch is the best checkpoint."""
    steps, every, branches, anneal = TRAJECTORY[size]
    base = _pretraining(TRAJECTORY_WARM_START, schedule="constant")
    trajectory = _run("step", 1, 1, 1, steps, TRAJECTORY_RATE, batch_size=64, saves=tuple(range(every, steps + 1, every)))
    annealed = tuple(
        _run(f"anneal-{step}", 1, 1, 1, anneal, TRAJECTORY_RATE, batch_size=64, schedule="cosine", warmup=0.0, start=f"step-{step}")
        for step in branches
    )
    return _plan(size, (trajectory,) + annealed, pretraining=base, design="trajectory")


TRAJECTORY_WARM_START = 300
TRAJECTORY_RATE = 3e-3
# (steps of the run, save every, annealed branches at, annealing steps)
TRAJECTORY = {"default": (1000, 200, (400, 800), 200), "small": (600, 150, (300,), 150)}


def _dominant(size: str) -> PoolPlan:
    """dominant: no headroom. One post-training run rehearses every skill and anneals (`all`: as
    good as the base, near 100% everywhere); the others rehearse a skewed mix at a high constant
    rate, and are no better than it at any skill."""
    best = _run("all", 1, 1, 1, DOMINANT_STEPS[size], 1e-3, schedule="cosine")
    variants = tuple(_post(i, *mix, DOMINANT_STEPS[size], 3e-3) for i, mix in enumerate(DOMINANT_MIXES[size], 1))
    return _plan(size, variants[:2] + (best,) + variants[2:], design="dominant")


DOMINANT_STEPS = {"default": 300, "small": 150}
DOMINANT_MIXES = {"default": [(1, 1, 0), (0, 1, 1), (1, 0, 1), (2, 1, 1), (1, 1, 2)], "small": [(1, 1, 0), (0, 1, 1), (1, 0, 1)]}


def _broken(size: str) -> PoolPlan:
    """broken: the forgetting pool plus one checkpoint whose run diverged (a learning rate far too
    high: its loss blows up and its weights grow large, but stay finite)."""
    diverged = _post(len(FORGETTING_RUNS[size]) + 1, 1, 1, 1, BROKEN_STEPS, BROKEN_RATE)
    return _plan(size, FORGETTING_RUNS[size] + (diverged,), design="broken")


BROKEN_STEPS = 150
BROKEN_RATE = 0.3


def _close(size: str) -> PoolPlan:
    """close: little headroom, and checkpoints that tie. The experts' base (stopped before its
    skills are finished), then short, gentle runs from it on nearly even mixes, each tilted a
    little towards one skill or another: the checkpoints are close to each other in weight space
    and within about a point of each other (97-99%, what is left is in `add`), some tied on dev.
    The case where the merge best on dev is often just the luckiest one (the winner's curse)."""
    base = _pretraining(EXPERTS_BASE_STEPS, schedule="constant", mix=EXPERTS_BASE_MIX)
    steps, rate = CLOSE[size]
    runs = tuple(_run(f"ft-{index}", *mix, steps, rate) for index, mix in enumerate(CLOSE_MIXES[size], 1))
    return _plan(size, runs, pretraining=base, design="close")


# (steps, learning rate) of each run, and the mixes (add, sort, shift)
CLOSE = {"default": (100, 5e-4), "small": (60, 5e-4)}
CLOSE_MIXES = {"default": [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 1), (2, 1, 2)],
               "small": [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 1)]}


def _qwen2(size: str) -> PoolPlan:
    """qwen2: the forgetting plan on a tiny Qwen2 with tied input and output embeddings, twice as
    wide (hidden size 64): at 32, a fixed 1,500-step cosine pretraining (the plan before
    LEARNT_BASE) never taught it `shift` (below chance on seeds 0 and 1). Its base now trains
    under LEARNT_BASE too, so a seed whose base never learns `shift` fails the build in one line."""
    return _plan(size, FORGETTING_RUNS[size], hidden_size=QWEN2_HIDDEN, design="qwen2", architecture="qwen2")


QWEN2_HIDDEN = 64


DESIGN_PLANS = {
    "forgetting": _forgetting,
    "experts": _experts,
    "trajectory": _trajectory,
    "dominant": _dominant,
    "broken": _broken,
    "close": _close,
    "qwen2": _qwen2,
}
DESIGNS = tuple(DESIGN_PLANS)
SIZES = ("default", "small")
DEFAULT_DESIGN = "forgetting"
# Every design's plan per size: DESIGN_PLAN[design][size].
DESIGN_PLAN: Dict[str, Dict[str, PoolPlan]] = {design: {size: make(size) for size in SIZES} for design, make in DESIGN_PLANS.items()}
# The forgetting design's plans, by size.
PLANS: Dict[str, PoolPlan] = DESIGN_PLAN[DEFAULT_DESIGN]


def plan_for(design: str = DEFAULT_DESIGN, size: str = "default") -> PoolPlan:
    """The plan of `design` (one of DESIGNS) at `size` (one of SIZES)."""
    if design not in DESIGN_PLAN:
        raise ValueError(f"no demo pool design {design!r}; choose one of {', '.join(DESIGNS)}")
    if size not in SIZES:
        raise ValueError(f"no demo pool size {size!r}; choose one of {', '.join(SIZES)}")
    return DESIGN_PLAN[design][size]


def pool_arguments(design: str, seed: int, size: str) -> str:
    """The command-line options that build a pool (--design only for a design other than the default)."""
    prefix = f"--design {design} " if design != DEFAULT_DESIGN else ""
    return f"{prefix}--seed {seed} --size {size}"


class PoolSummary(BaseModel):
    """What `demo-pool.json` records: how the pool was built and how each checkpoint scores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int
    # Pools built before designs existed are of the default design.
    design: str = "forgetting"
    seed: int
    size: str
    fingerprint: str
    checkpoints: Dict[str, str]
    tasks: List[SkillTasks]
    scores: Dict[str, Dict[str, float]]
    build_seconds: float
    # The hash of what was built (content_fingerprint); absent from pools built before format 4.
    content_fingerprint: Optional[str] = None

    def macro(self, checkpoint: str, split: str) -> float:
        names = [getattr(task, split) for task in self.tasks]
        return sum(self.scores[checkpoint][name] for name in names) / len(names)


def plan_recipe(plan: PoolPlan) -> str:
    """The recipe a pool built from `plan` ships: its post-training checkpoints and tasks."""
    name = "toy-recycle" if plan.design == DEFAULT_DESIGN else f"toy-recycle-{plan.design}"
    return recipe_text(name, list(plan.pool()), skill_tasks(), budget=200)


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
    if (summary.design, summary.seed, summary.size) != (plan.design, seed, plan.size):
        raise DemoPoolExistsError(
            directory,
            f"already holds a demo pool built with {pool_arguments(summary.design, summary.seed, summary.size)}; "
            f"choose another folder or delete this one to build {pool_arguments(plan.design, seed, plan.size)}",
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


def train_pool(workspace: Path, seed: int, plan: PoolPlan, report: Report = lambda line: None) -> None:
    """Train every run of `plan` in this process and save its checkpoints into `workspace`.

    The bytes are pinned (see README, The demo pool) only in a process started with
    PINNED_ENVIRONMENT; build_pool runs this in one (worker.py)."""
    import torch

    examples = evaluation_examples(seed, plan.dev_size, plan.test_size)
    # Every question the tasks ask: training never sees one.
    questions = frozenset(row["question"] for splits in examples.values() for rows in splits.values() for row in rows)
    tokenizer = char_tokenizer()
    runs = plan.runs
    saved = {}  # checkpoint name -> the model saved there, for the runs that start from it
    for index, run in enumerate(runs):
        if run is plan.pretraining:
            model = tiny_model(tokenizer, seed=seed, architecture=plan.architecture, hidden_size=plan.hidden_size, layers=plan.layers)
        else:
            model = copy.deepcopy(saved[run.start or plan.pretraining.checkpoints()[-1]])
        started = time.perf_counter()
        label = f"[{index + 1}/{len(runs)}] {run.name} ({run.describe()})"
        snapshots = {}

        def progress(step: int, total: int, loss: float) -> None:
            if step in run.saves and step != total:
                snapshots[step] = copy.deepcopy(model.state_dict())
            if step % max(1, total // 4) == 0 or step == total:
                report(f"{label}: step {step}/{total}, loss {loss:.3f}")

        try:
            train(model, tokenizer, run, seed=seed * 1009 + index, exclude=questions, progress=progress,
                  log=lambda line: report(f"{label}: {line}"))
        except SkillsNotLearnt as exc:
            raise DemoPoolError(workspace, str(exc)) from None
        for name, step in zip(run.checkpoints(), run.saves or (run.steps,)):
            checkpoint = model
            if step != run.steps:
                checkpoint = copy.deepcopy(model)
                checkpoint.load_state_dict(snapshots[step])
            if not all(torch.isfinite(tensor).all() for tensor in checkpoint.state_dict().values()):
                raise DemoPoolError(workspace, f"run {run.name} left non-finite weights in {name}; the plan needs a lower learning rate")
            save_checkpoint(checkpoint, tokenizer, workspace / name)
            saved[name] = checkpoint
        report(f"{label}: done in {time.perf_counter() - started:.1f} s")


def _train_pool(workspace: Path, seed: int, plan: PoolPlan, report: Report, directory: Path) -> Dict[str, str]:
    """Run train_pool in a child process started with PINNED_ENVIRONMENT, passing its progress
    lines on to `report`; return what each checkpoint is."""
    command = [sys.executable, "-m", "mergekit_recycle.demo_pool.worker", str(workspace), str(seed)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **PINNED_ENVIRONMENT})
    try:
        child.stdin.write(plan.model_dump_json())
        child.stdin.close()
        error = None
        for line in child.stdout:
            message = json.loads(line)
            if "progress" in message:
                report(message["progress"])
            error = message.get("error", error)
        if child.wait() != 0:
            raise DemoPoolError(directory, error or f"the training process failed (exit status {child.returncode}; its errors are above)")
    finally:
        # Interrupted (Ctrl-C, or `report` raised): the child must not go on writing into the workspace.
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    return {name: run.describe_checkpoint(name) for run in plan.runs for name in run.checkpoints()}


def content_fingerprint(directory: Path, checkpoints: List[str], tasks: List[SkillTasks]) -> str:
    """A hash of what a pool holds: every tensor of each checkpoint (name, dtype, shape and bytes,
    in checkpoint order and tensor-name order) and the bytes of every task's data file.

    It reads the tensors, not the files: safetensors' header layout, config.json and the tokenizer
    files (which record the transformers version) do not change it; the numbers do."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    for checkpoint in checkpoints:
        with safe_open(str(Path(directory) / checkpoint / "model.safetensors"), framework="pt") as weights:
            for name in sorted(weights.keys()):
                tensor = weights.get_tensor(name).contiguous()
                digest.update(json.dumps([checkpoint, name, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
                digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    for name in sorted(name for task in tasks for name in (task.search, task.holdout)):
        digest.update(json.dumps([f"tasks/{name}.jsonl"]).encode() + b"\n")
        digest.update((Path(directory) / "tasks" / f"{name}.jsonl").read_bytes())
    return digest.hexdigest()[:16]


def _score_pool(workspace: Path, checkpoints: List[str], tasks: List[SkillTasks], report: Report) -> Dict[str, Dict[str, float]]:
    """Every checkpoint's accuracy on every dev and test task, scored by lm-eval."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_recycle.evaluate import Scorer

    first = workspace / checkpoints[0]
    model = AutoModelForCausalLM.from_pretrained(first).eval()
    names = [name for task in tasks for name in (task.search, task.holdout)]
    scorer = Scorer(model, AutoTokenizer.from_pretrained(first), names, [workspace / "tasks"])
    # A checkpoint with tied embeddings stores the input embedding only; the model's output
    # embedding is the same tensor, so it is loaded with it.
    tied = {name for name in model.state_dict() if name not in load_file(first / "model.safetensors")}
    scores = {}
    for checkpoint in checkpoints:
        missing, unexpected = model.load_state_dict(load_file(workspace / checkpoint / "model.safetensors"), strict=False)
        if set(missing) != tied or unexpected:
            raise DemoPoolError(workspace.parent, f"{checkpoint} does not load into its model: missing {missing}, unexpected {unexpected}")
        scores[checkpoint] = {name: metrics["acc"] for name, metrics in scorer.score().items()}
        report(f"scored {checkpoint}")
    return scores


def build_pool(directory: Path, seed: int = 0, size: Union[str, PoolPlan] = "default",
               report: Report = lambda line: None, design: str = DEFAULT_DESIGN) -> PoolSummary:
    """Build the demo pool of `design` (one of DESIGNS) and `size` (one of SIZES; or a plan of
    your own, which carries its design) from `seed` in `directory` and return its summary; a
    no-op when `directory` already holds that pool. `report` receives progress lines."""
    from transformers.utils import logging as transformers_logging

    if Path(directory).name in ("", ".", "..") or Path(directory).is_symlink() or os.path.ismount(directory):
        raise DemoPoolError(directory, "give the pool a folder of its own (not '.', '..', a link or a mount point)")
    directory = Path(os.path.abspath(directory))
    plan = plan_for(design, size) if isinstance(size, str) else size
    existing = _existing_pool(directory, seed, plan)
    if existing is not None:
        report(f"{directory} already holds this pool ({pool_arguments(plan.design, seed, plan.size)}); nothing to do")
        return existing
    workspace = _workspace(directory)
    try:
        transformers_logging.disable_progress_bar()
        started = time.perf_counter()
        descriptions = _train_pool(workspace, seed, plan, report, directory)
        tasks = write_tasks(workspace / "tasks", evaluation_examples(seed, plan.dev_size, plan.test_size))
        scores = _score_pool(workspace, list(descriptions), tasks, report)
        (workspace / "recipe.yaml").write_text(plan_recipe(plan))
        summary = PoolSummary(
            format=FORMAT, design=plan.design, seed=seed, size=plan.size, fingerprint=plan.fingerprint(), checkpoints=descriptions,
            tasks=tasks, scores=scores, build_seconds=round(time.perf_counter() - started, 1),
            content_fingerprint=content_fingerprint(workspace, list(descriptions), tasks),
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
    if summary.content_fingerprint:
        lines.append(f"content fingerprint: {summary.content_fingerprint} (name it with any figure measured on this pool)")
    return "\n".join(lines)
