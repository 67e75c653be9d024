"""Per-candidate cost of our resident evaluation loop, before and after its scoring changes, against
mergekit-evolve's on-disk loop, in one run.

    .venv/bin/python bench/candidate_cost.py [--recipe recipes/pool.yaml | --shape {mc30k,long}]
                                             [--synthetic HIDDEN LAYERS] [--no-before]
                                             [--candidates 6] [--seed 0] [--threads 2] [--warmup 1]
                                             [--json PATH] [--profile]

Why: a search scores many candidates, so what one candidate costs decides how far a budget
goes. mergekit-evolve's on-disk loop (its `OnDiskMergeEvaluator`) writes every candidate to a
folder with `run_merge`, loads it back through `lm_eval.simple_evaluate` and deletes it. Ours
(`ResidentEvaluator`) builds the model, the lm-eval tasks, their requests and the HFLM once, then
per candidate copies the merged tensors into the resident model and scores it (`Scorer.score`).

The loops, each scoring the same candidates (seeded Dirichlet draws over the pool) on the recipe's
search tasks, on the CPU, in float32:
  - on-disk: built as mergekit-evolve builds it (mergekit.evo.helpers imports ray, so its
    merge_model / evaluate_model are restated here): `ModelGenome` with merge_method linear ->
    `genotype_merge_config` (its hard-coded bfloat16 set to float32) -> `run_merge` into a temp
    folder with mergekit-evolve's MergeOptions (tokenizer copied) -> `simple_evaluate(model="hf")`
    on that folder (TaskManager built once) -> delete it;
  - ours-before: a `ResidentEvaluator` built with MERGEKIT_RECYCLE_SHARED_PREFIX=0 (no shared-prefix
    packing of multiple-choice continuations) and MERGEKIT_RECYCLE_VECTOR_METRICS=0 (lm-eval's own
    per-document acc/acc_norm): our scorer before those changes (`--no-before` leaves it out);
  - ours (after): a `ResidentEvaluator` built with both switches unset and `--batch-size auto`, as
    `optimize` runs; ours-before scores with the batch size it chose, the on-disk loop with 256.
They run candidate by candidate in one process, the order rotating from one candidate to the next,
so that load from a neighbour on the machine hits all alike. `--warmup` candidates are run through
all first and not counted; at least as many as ours checks its shortcuts against lm-eval's way on
(the first candidates of a search, which cost more). Every candidate's time is split into the
merge, lm-eval's parts (class-level timers: building requests, tokenizing, forward passes,
batching, per-document results, and for the on-disk loop loading the model, building the tasks and
lm-eval's environment report) and, for ours, everything else (per candidate - merge - forward
passes: the issue's split).

Forward tokens per candidate: every call of the model's decoder is counted, in both loops:
`padded`, the size of its input ids, and `real`, the ids other than 0 (the padding value of lm-eval's
HFLM and of our scorer; the <pad> of the char tokenizer of these pools, so never a real token). Where
the scorer reports its own count (`Scorer.forward_stats()`, "tokens" and "padded"), ours is taken
from it, and checked against the counted ones. Per question is per search question.

Pools:
  - `--recipe` (default recipes/pool.yaml): the demo pool that `make demo` builds in .toy-pool.
  - `--shape mc30k`: the issue's pool: 7 checkpoints of the demo architecture (`tiny_llama`, char
    tokenizer) with hidden size 32 and 3 layers (33.8k parameters), and 3 multiple-choice tasks x 500
    dev questions x 4 choices, question and answer lengths as the demo's tasks (6, 12-16 and 12
    characters; answers of 2-3, 6-10 and 5), the target delimiter " " (lm-eval's default) before each
    choice: 1 character is 1 token, plus BOS.
  - `--shape long`: a HellaSwag-like shape on the same checkpoints (max positions 256): 3 tasks x 200
    dev questions, ~100-token contexts (90-110 characters), 4 continuations of ~20 tokens (" " and
    14-24 characters), scored on acc_norm (with acc) as HellaSwag is.
  - `--synthetic HIDDEN LAYERS` (e.g. 512 8): a bigger model; alone, 8 checkpoints at that size with
    the demo's tasks (copied from .toy-pool/tasks); with --shape, the shape's pool at that size.
A shape or synthetic pool's checkpoints are untrained random weights (they score near chance:
this measures cost, not quality), its question text is seeded random words, and it is built with a
recipe in a temporary folder deleted at exit.

It checks that all loops give the same search scores and the same merged tensors for every
candidate. Figures are medians over the candidates; speed is given as ratios against the on-disk
loop of the same run, with absolute seconds to size them.
"""

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

import lm_eval
import lm_eval.evaluator
from lm_eval.api.model import TemplateLM
from lm_eval.api.task import ConfigurableTask, Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from mergekit.common import ModelReference
from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_recycle.candidate import ResidentEvaluator
from mergekit_recycle.constants import SHARED_PREFIX_VARIABLE, VECTOR_METRICS_VARIABLE
from mergekit_recycle.demo_pool import char_tokenizer, save_checkpoint, tiny_llama
from mergekit_recycle.demo_pool.tasks import LOADER, multiple_choice_yaml
from mergekit_recycle.evaluate import leaf_tasks, quiet_lm_eval
from mergekit_recycle.loglikelihoods import PreparedLoglikelihoods
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe

# The on-disk loop scores with the batch size of the earlier figures; ours with --batch-size auto, as
# `optimize` does (measured when it is built; its choice is printed), and ours-before with ours' choice.
BATCH_SIZE = 256
DEMO_TASKS = Path(__file__).resolve().parent.parent / ".toy-pool" / "tasks"  # built by `make demo`
DEMO_TASK_NAMES = [(name, f"toy_{name}_dev", f"toy_{name}_test") for name in ("add", "sort", "shift")]
SYNTHETIC_CHECKPOINTS = 8  # --synthetic without --shape
PAD = 0  # the padding value of HFLM and of our scorer; the char tokenizer's <pad>
# Set while ours-before is built: a Scorer reads them when it is built.
BEFORE = {SHARED_PREFIX_VARIABLE: "0", VECTOR_METRICS_VARIABLE: "0"}


@dataclass(frozen=True)
class TaskShape:
    name: str
    question: Tuple[int, int]  # characters (= tokens: the char tokenizer; BOS comes on top)
    choice: Tuple[int, int]  # characters of each choice; the target delimiter " " adds a token


@dataclass(frozen=True)
class Shape:
    about: str
    checkpoints: int
    hidden: int
    layers: int
    max_positions: int
    dev: int  # questions per search task (all scored)
    test: int  # questions per holdout task (built, never scored here)
    metrics: Tuple[str, ...]  # the tasks' metric_list; the recipe scores the last
    tasks: Tuple[TaskShape, ...]


SHAPES = {
    "mc30k": Shape("the issue's pool: 7 checkpoints of ~30k parameters, 3 multiple-choice tasks x 500 dev "
                   "questions x 4 choices, of the demo tasks' lengths", 7, 32, 3, 64, 500, 100, ("acc",),
                   (TaskShape("a", (6, 6), (2, 3)), TaskShape("b", (12, 16), (6, 10)), TaskShape("c", (12, 12), (5, 5)))),
    "long": Shape("HellaSwag-like: ~100-token contexts, 4 continuations of ~20 tokens", 7, 32, 3, 256, 200, 50,
                  ("acc", "acc_norm"), tuple(TaskShape(name, (90, 110), (14, 24)) for name in "abc")),
}

_WORD_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def random_text(rng: random.Random, length: int) -> str:
    """`length` characters of words (letters and digits) split by single spaces, no space at either end."""
    out: List[str] = []
    while len(out) < length:
        space = out and out[-1] != " " and len(out) < length - 1 and rng.random() < 0.2
        out.append(" " if space else rng.choice(_WORD_CHARACTERS))
    return "".join(out)


def mc_questions(rng: random.Random, task: TaskShape, count: int) -> List[dict]:
    """`count` questions ending in ":", each with 4 distinct choices, the answer at a random index."""
    rows = []
    for _ in range(count):
        question = random_text(rng, rng.randint(*task.question) - 1) + ":"
        choices: List[str] = []
        while len(choices) < 4:
            choice = random_text(rng, rng.randint(*task.choice))
            if choice not in choices:
                choices.append(choice)
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    return rows


def write_shape_tasks(tasks_dir: Path, shape_name: str, shape: Shape, seed: int = 0) -> List[Tuple[str, str, str]]:
    """A dev (search) and a test (holdout) lm-eval task per task of the shape; (name, search, holdout) of each."""
    tasks_dir.mkdir(parents=True)
    (tasks_dir / "toy_data.py").write_text(LOADER)
    names = []
    for index, task in enumerate(shape.tasks):
        rows = mc_questions(random.Random(seed * 1000 + index), task, shape.dev + shape.test)
        search, holdout = f"{shape_name}_{task.name}_dev", f"{shape_name}_{task.name}_test"
        for name, part in ((search, rows[:shape.dev]), (holdout, rows[shape.dev:])):
            with open(tasks_dir / f"{name}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row) + "\n" for row in part)
            (tasks_dir / f"{name}.yaml").write_text(multiple_choice_yaml(name, " ", shape.metrics))
        names.append((task.name, search, holdout))
    return names


def write_checkpoints(folder: Path, count: int, hidden: int, layers: int, max_positions: Optional[int]) -> List[str]:
    """`count` randomly initialised checkpoints of the demo architecture (seeds 1..count); their folder names."""
    tokenizer = char_tokenizer()
    names = []
    for seed in range(1, count + 1):
        model = tiny_llama(tokenizer, seed=seed, hidden_size=hidden, layers=layers)
        if max_positions:  # rotary embeddings: the weights do not depend on it
            model.config.max_position_embeddings = max_positions
        save_checkpoint(model, tokenizer, folder / f"ckpt-{seed}")
        names.append(f"ckpt-{seed}")
        del model
    return names


def write_recipe(folder: Path, name: str, comment: str, checkpoints: Sequence[str],
                 tasks: Sequence[Tuple[str, str, str]], metric: str) -> Path:
    """A recipe like recipes/pool.yaml over `checkpoints` and `tasks` ((name, search, holdout) each) in `folder`."""
    recipe = folder / "recipe.yaml"
    recipe.write_text("\n".join([
        f"# {comment}",
        f"name: {name}",
        "pool:", *(f"  - path: {checkpoint}" for checkpoint in checkpoints),
        "base: null",
        "tasks:", *(f"  - name: {task}\n    search: {search}\n    holdout: {holdout}\n    metric: {metric}\n"
                    "    weight: 1.0" for task, search, holdout in tasks),
        "task_paths: [tasks]",
        "search: {budget: 60, population: null, sigma0: 0.25, seed: 0, scale: 1.0}",
        "merge: {dtype: float32, device: auto}",
        "output: {run_dir: runs/candidate-cost, hub_repo: null, private: true}",
        "",
    ]))
    return recipe


def build_pool(folder: Path, shape_name: Optional[str], synthetic: Optional[Tuple[int, int]]) -> Path:
    """Build the `--shape` / `--synthetic` pool, its tasks and its recipe in `folder`; return the recipe."""
    if shape_name:
        shape = SHAPES[shape_name]
        hidden, layers = synthetic or (shape.hidden, shape.layers)
        checkpoints = write_checkpoints(folder, shape.checkpoints, hidden, layers, shape.max_positions)
        tasks = write_shape_tasks(folder / "tasks", shape_name, shape)
        metric = shape.metrics[-1]
    else:
        if not (DEMO_TASKS / "toy_add_dev.yaml").is_file():
            raise SystemExit(f"--synthetic needs the demo's lm-eval tasks in {DEMO_TASKS}; run `make demo` first")
        hidden, layers = synthetic
        checkpoints = write_checkpoints(folder, SYNTHETIC_CHECKPOINTS, hidden, layers, None)
        shutil.copytree(DEMO_TASKS, folder / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
        tasks, metric = DEMO_TASK_NAMES, "acc"
    flags = " ".join(filter(None, [f"--shape {shape_name}" if shape_name else "",
                                   f"--synthetic {hidden} {layers}" if synthetic else ""]))
    return write_recipe(folder, f"{shape_name or 'synthetic'}-h{hidden}-l{layers}",
                        f"bench/candidate_cost.py {flags}: untrained checkpoints, for cost only.", checkpoints, tasks, metric)


class Stopwatch:
    """Seconds spent inside the functions it wraps, since the last reset."""

    def __init__(self):
        self.seconds = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


# Class-level wrappers, so that they also time the HFLM and tasks that simple_evaluate builds
# inside itself.
WATCHES: Dict[str, Stopwatch] = {}


def watch(owner, name: str, key: str) -> None:
    stopwatch = WATCHES.setdefault(key, Stopwatch())
    setattr(owner, name, stopwatch.wrap(getattr(owner, name)))


watch(PreparedLoglikelihoods, "score", "prepared")  # ours: batching, forward, log-softmax, greedy check
watch(HFLM, "_loglikelihood_tokens", "loglikelihood_tokens")  # batching, forward, log-softmax, greedy check
watch(TemplateLM, "loglikelihood", "loglikelihood")  # tokenizing, then _loglikelihood_tokens
watch(Task, "build_all_requests", "build_requests")  # renders every document's prompt and choices
watch(ConfigurableTask, "process_results", "process_results")  # per document, from its log-likelihoods
watch(HFLM, "__init__", "load_model")
watch(TaskManager, "load", "build_tasks")
for _name in ("add_env_info", "get_git_commit_hash", "add_tokenizer_info"):  # once per simple_evaluate
    watch(lm_eval.evaluator, _name, "env_report")


class TokenCounter:
    """Tokens fed to a model class's forward since the last reset: its input ids' size (padded) and
    the ids other than PAD (real)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls, self.padded, self.real = 0, 0, 0

    def wrap(self, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def counted(module, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_tensor(ids):
                self.calls += 1
                self.padded += ids.numel()
                self.real += int((ids != PAD).sum())
            elif torch.is_tensor(kwargs.get("inputs_embeds")):
                raise SystemExit("the model was called with inputs_embeds: the token count cannot see its tokens")
            return forward(module, *args, **kwargs)

        return counted

    def counts(self) -> Dict[str, int]:
        return {"forward_calls": self.calls, "forward_padded": self.padded, "forward_real": self.real}


FORWARD = TokenCounter()


def watch_model(model: torch.nn.Module) -> None:
    """Time the forward passes of the model's class and count the tokens its decoder (whichever entry
    point calls it) is fed: class-level, so that the on-disk loop's freshly loaded models are seen too."""
    watch(type(model), "forward", "forward")
    decoder = type(model.base_model)
    decoder.forward = FORWARD.wrap(decoder.forward)


def lm_eval_parts() -> Dict[str, float]:
    """Where lm-eval's time went since the last reset; nested watches turned into disjoint parts."""
    seconds = {key: stopwatch.seconds for key, stopwatch in WATCHES.items()}
    # Ours tokenizes once at set-up and replaces _loglikelihood_tokens with PreparedLoglikelihoods.
    scoring = seconds["prepared"] or seconds["loglikelihood_tokens"]
    return {
        "build_requests": seconds["build_requests"],
        "tokenize": max(seconds["loglikelihood"] - seconds["loglikelihood_tokens"], 0.0),
        "forward": seconds["forward"],
        "batching": scoring - seconds["forward"],
        "process_results": seconds["process_results"],
        "load_model": seconds["load_model"],
        "build_tasks": seconds["build_tasks"],
        "env_report": seconds["env_report"],
    }


def reset_watches() -> None:
    for stopwatch in WATCHES.values():
        stopwatch.reset()
    FORWARD.reset()


def proposals(count: int, names: List[str], seed: int) -> List[List[float]]:
    """`count` weight vectors over the pool: uniform draws from the simplex."""
    rng = np.random.default_rng(seed)
    return [[float(w) for w in rng.dirichlet(np.ones(len(names)))] for _ in range(count)]


@contextlib.contextmanager
def environment(values: Dict[str, Optional[str]]):
    """Set (a value) or unset (None) environment variables for the block."""
    saved = {name: os.environ.get(name) for name in values}

    def apply(settings):
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)


class Ours:
    """One candidate of one of our loops: total = merge + forward + rest (the issue's split)."""

    def __init__(self, evaluator: ResidentEvaluator, names: List[str]):
        self.evaluator = evaluator
        self.names = names

    def candidate(self, weights: List[float]) -> Dict:
        reset_watches()
        start = time.perf_counter()
        evaluation = self.evaluator.evaluate(Merge(weights=dict(zip(self.names, weights)), scale=1.0), "search")
        total = time.perf_counter() - start
        parts = lm_eval_parts()
        row = {
            "total": total, "merge": evaluation.merge_seconds, "eval": evaluation.eval_seconds, **parts,
            "rest": total - evaluation.merge_seconds - parts["forward"],
            "other": evaluation.eval_seconds - sum(parts.values()),
            "scores": dict(evaluation.scores), **FORWARD.counts(),
        }
        stats = getattr(self.evaluator.scorers["search"], "forward_stats", None)
        if callable(stats):  # the scorer's own count, of this score() call
            row["scorer_forward_stats"] = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                                           for k, v in dict(stats()).items()}
        return row


class OnDisk:
    """mergekit-evolve's OnDiskMergeEvaluator.evaluate_genotype, serially, on the CPU, in float32."""

    def __init__(self, recipe, pool, storage: Path):
        self.genome = ModelGenome(ModelGenomeDefinition(
            models=[ModelReference.model_validate(str(c.path)) for c in pool.checkpoints], merge_method="linear"))
        self.storage = storage
        # As mergekit-evolve builds them (scripts/evolve.py), less the GPU-only settings.
        self.options = MergeOptions(
            transformers_cache=str(storage / "transformers_cache"), lora_merge_cache=str(storage / "lora_merge_cache"),
            out_shard_size=1_000_000_000_000, quiet=True, copy_tokenizer=True, safe_serialization=True)
        self.tasks = {task.search: task for task in recipe.tasks}
        # Built once and reused, as mergekit-evolve's strategies do.
        self.task_manager = TaskManager(include_path=[str(p) for p in recipe.task_paths], include_defaults=False)
        self.tensors: Dict[str, torch.Tensor] = {}  # the last candidate's merge, as written

    def config(self, weights: List[float]):
        genotype = torch.tensor(weights, dtype=torch.float32)  # (models,) -> (1 layer group, models, 1, 1)
        config = self.genome.genotype_merge_config(genotype)
        return config.model_copy(update={"dtype": "float32"})  # the genome hard-codes bfloat16

    def candidate(self, weights: List[float]) -> Dict:
        """One candidate: total = merge (genotype -> config -> run_merge) + eval (simple_evaluate) + cleanup.
        Keeps the merged tensors, read back untimed, to check against our merges."""
        reset_watches()
        start = time.perf_counter()
        out = Path(tempfile.mkdtemp(prefix="merged", dir=self.storage))
        run_merge(self.config(weights), out_path=str(out), options=self.options)
        merged = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(out), "dtype": "float32", "use_cache": True},
            tasks=list(self.tasks), log_samples=False, verbosity="ERROR", task_manager=self.task_manager,
            batch_size=BATCH_SIZE, device="cpu",
        )
        evaluated = time.perf_counter()
        parts = lm_eval_parts()
        counts = FORWARD.counts()
        self.tensors = {}  # untimed
        for shard in out.glob("*.safetensors"):
            self.tensors.update(load_file(str(shard)))
        cleanup_start = time.perf_counter()
        shutil.rmtree(out)
        end = time.perf_counter()
        return {
            "total": (evaluated - start) + (end - cleanup_start), "merge": merged - start, "eval": evaluated - merged,
            "cleanup": end - cleanup_start, **parts, "other": (evaluated - merged) - sum(parts.values()),
            "scores": {task.name: float(results["results"][name][task.metric_key]) for name, task in self.tasks.items()},
            **counts,
        }


def max_difference(model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> float:
    state = model.state_dict()
    return max(float((tensor.float() - state[name].float()).abs().max()) for name, tensor in tensors.items())


def tokens(row: Dict, kind: str) -> Optional[int]:
    """A row's forward tokens, `real` or `padded`: the scorer's own count where it gives one."""
    stats = row.get("scorer_forward_stats")
    if stats is not None:
        return stats.get("tokens" if kind == "real" else "padded")
    return row[f"forward_{kind}"]


def median(rows: List[Dict], key) -> float:
    return statistics.median(key(row) if callable(key) else row[key] for row in rows)


def spread(values: List[float], unit: str = "x") -> str:
    return f"median {statistics.median(values):.2f}{unit}, range {min(values):.2f}-{max(values):.2f}{unit}"


def thousands(count: Optional[float]) -> str:
    return "n/a" if count is None else f"{count / 1e3:.1f}k" if count >= 1e4 else f"{count:.0f}"


LOOPS = {"on_disk": "on-disk", "before": "ours-before", "after": "ours"}
ROWS = [  # (label, key in the on-disk rows or None, key in our rows or None)
    ("per candidate", "total", "total"),
    ("merge (ours: into the resident model; on-disk: run_merge to a folder)", "merge", "merge"),
    ("scoring (ours: Scorer.score; on-disk: simple_evaluate on the folder)", "eval", "eval"),
    ("  load the model (HFLM from the folder)", "load_model", None),
    ("  build the tasks (TaskManager.load)", "build_tasks", None),
    ("  build requests (render prompts and choices)", "build_requests", "build_requests"),
    ("  tokenize", "tokenize", "tokenize"),
    ("  forward passes", "forward", "forward"),
    ("  batching, log-softmax", "batching", "batching"),
    ("  process results (per-document metrics)", "process_results", "process_results"),
    ("  environment report (git describe, torch collect_env)", "env_report", None),
    ("  other", "other", "other"),
    ("delete the folder", "cleanup", None),
    ("everything else (ours: per candidate - merge - forward)", None, "rest"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, help="the pool and tasks to compare on (default: recipes/pool.yaml)")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="instead of --recipe, a temporary pool of this shape: " +
                             "; ".join(f"{name}: {shape.about}" for name, shape in SHAPES.items()))
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                        help="instead of --recipe, a temporary pool of random checkpoints of the demo architecture "
                             "with this hidden size and number of layers: 8 with the demo's tasks, or --shape's")
    parser.add_argument("--no-before", dest="before", action="store_false",
                        help="leave out ours-before (our scorer with %s)" % " and ".join(f"{k}={v}" for k, v in BEFORE.items()))
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed candidates run through every loop first")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one more candidate of our loop and print where its time goes")
    args = parser.parse_args()
    if args.synthetic:
        hidden, layers = args.synthetic
        if hidden < 8 or hidden % 8 or layers < 1:  # 4 heads of an even head size (rotary embeddings)
            parser.error("--synthetic: HIDDEN must be a positive multiple of 8 and LAYERS at least 1")
    if args.candidates < 1:
        parser.error("--candidates must be at least 1")
    if (args.synthetic or args.shape) and args.recipe is not None:
        parser.error("--shape and --synthetic build their own recipe; leave out --recipe")
    if args.recipe is None and not (args.synthetic or args.shape):
        args.recipe = Path("recipes/pool.yaml")

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    quiet_lm_eval()
    with contextlib.ExitStack() as stack:
        built = None
        if args.synthetic or args.shape:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="candidate-cost-pool-")))
            start = time.perf_counter()
            args.recipe = build_pool(folder, args.shape, args.synthetic)
            built = time.perf_counter() - start
        compare(args, built)


def request_lengths(evaluator: ResidentEvaluator) -> Dict[str, float]:
    """The search requests as HFLM tokenizes them: how many, and their mean context and continuation tokens."""
    lm = evaluator.scorers["search"].lm
    pairs = [instance.args for task in leaf_tasks(evaluator.scorers["search"].task_dict).values()
             for instance in task.instances]
    encoded = [lm._encode_pair(context, continuation) for context, continuation in pairs]
    return {"requests": len(encoded),
            "context_tokens": statistics.mean(len(context) for context, _ in encoded),
            "continuation_tokens": statistics.mean(len(continuation) for _, continuation in encoded)}


def build_evaluator(recipe, pool, source: Path, switches: Dict[str, Optional[str]],
                    batch_size=BATCH_SIZE) -> Tuple[ResidentEvaluator, float]:
    start = time.perf_counter()
    with environment(switches):
        evaluator = ResidentEvaluator(recipe, pool, device="cpu", source=source, batch_size=batch_size)
    return evaluator, time.perf_counter() - start


def compare(args: argparse.Namespace, built) -> None:
    load_before = _load_average()
    recipe = load_recipe(args.recipe)
    # Every loop scores every document of the search tasks: the on-disk loop knows nothing of the
    # documents a recipe holds back for choosing the winner (selection.holdback).
    recipe = recipe.model_copy(update={"selection": recipe.selection.model_copy(update={"holdback": 0.0})})
    if recipe.merge.dtype != "float32":
        raise SystemExit(f"the benchmark compares float32 merges; {args.recipe} asks for {recipe.merge.dtype}")
    pool = resolve_pool(recipe, args.recipe)
    names = pool.names

    evaluators, setup = {}, {}
    evaluators["after"], setup["after"] = build_evaluator(recipe, pool, args.recipe, {name: None for name in BEFORE},
                                                          batch_size="auto")
    if args.before:  # at ours' batch size: the difference is the scoring, not the batch
        evaluators["before"], setup["before"] = build_evaluator(recipe, pool, args.recipe, BEFORE,
                                                                batch_size=evaluators["after"].batch_size)
    model = evaluators["after"].model
    watch_model(model)
    tokenizer = evaluators["after"].scorers["search"].lm.tokenizer
    if tokenizer.convert_ids_to_tokens(PAD) not in tokenizer.all_special_tokens:
        print(f"note: token id {PAD} is a real token of this tokenizer: counted real tokens leave it out")
    # Ours checks its shortcuts against lm-eval's way on the first candidates of a run (packing on the
    # first, vectorised metrics on the first few): those count as warm-up, as they would in a search.
    search = evaluators["after"].scorers["search"]
    checked = getattr(search, "checks_left", 0) if getattr(search, "vectorised", None) else 0
    warmup = max(args.warmup, checked)
    draws = proposals(warmup + args.candidates, names, args.seed)

    params = sum(p.numel() for p in model.parameters())
    config = model.config
    source = " ".join(filter(None, [f"shape {args.shape}" if args.shape else "",
                                    "synthetic {} {}".format(*args.synthetic) if args.synthetic else ""]))
    pool_info = {
        "source": source or str(args.recipe),
        "checkpoints": len(names), "parameters": params, "checkpoint_bytes": pool.layout.nbytes,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "layers": config.num_hidden_layers, "heads": config.num_attention_heads, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }
    questions = sum(len(list(task.eval_docs)) for task in leaf_tasks(evaluators["after"].scorers["search"].task_dict).values())
    lengths = request_lengths(evaluators["after"])
    pool_info.update(questions=questions, **lengths)

    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "lm_eval": lm_eval.__version__, "mergekit": _version("mergekit"),
        "transformers": _version("transformers"),
    }
    print(f"load average (1, 5, 15 min) at the start: {load_before}")
    if built is not None:
        print(f"{source} pool: {len(names)} untrained checkpoints and their tasks built in {built:.1f} s in "
              f"{args.recipe.parent} (deleted at exit)")
    size = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params / 1e3:.1f}k"
    print(f"pool: {len(names)} checkpoints of {size} parameters, {pool.layout.nbytes / 1e6:.2f} MB each "
          f"(hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads, vocab {config.vocab_size}; {pool_info['source']})")
    print(f"search tasks: {', '.join(t.search for t in recipe.tasks)} (metric {', '.join(sorted({t.metric for t in recipe.tasks}))}): "
          f"{questions} questions, {lengths['requests']} requests of {lengths['context_tokens']:.1f} context + "
          f"{lengths['continuation_tokens']:.1f} continuation tokens on average; batch size {BATCH_SIZE} "
          f"(on-disk), ours and ours-before: {evaluators['after'].batch_size} (auto: "
          f"{evaluators['after'].batch_size_reason})")
    print(f"machine: {machine['platform']}, {machine['processor']}, {machine['cores']} cores, python {machine['python']}, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}, "
          f"lm-eval {machine['lm_eval']}, mergekit {machine['mergekit']}")
    print("our one-off set-up (resident model, merger, search and holdout scorers): "
          + ", ".join(f"{LOOPS[key]} {seconds:.2f} s" for key, seconds in setup.items()))
    if args.before:
        print(f"ours-before: built with {' '.join(f'{k}={v}' for k, v in BEFORE.items())}")

    rows: Dict[str, List[Dict]] = {key: [] for key in LOOPS if key == "on_disk" or key in evaluators}
    warm_rows: Dict[str, List[Dict]] = {key: [] for key in rows}
    if warmup > args.warmup:
        print(f"warm-up: {warmup} candidates, not {args.warmup}: ours checks its vectorised metrics against "
              f"lm-eval's on the first {checked} of a run")
    with tempfile.TemporaryDirectory(prefix="candidate-cost-") as tmp:
        disk = OnDisk(recipe, pool, Path(tmp))
        loops = [(key, disk.candidate if key == "on_disk" else Ours(evaluators[key], names).candidate) for key in rows]
        for index, weights in enumerate(draws):
            # Rotate which loop goes first, so that none always runs on caches another warmed.
            shift = index % len(loops)
            row = {key: run(weights) for key, run in loops[shift:] + loops[:shift]}
            for key, evaluator in evaluators.items():  # each resident model holds this candidate's merge
                row[key]["max_weight_difference"] = max_difference(evaluator.model, disk.tensors)
            warm = index < warmup
            for key in rows:
                (warm_rows if warm else rows)[key].append(row[key])
            print(f"{'warm-up' if warm else 'candidate'} {index}: "
                  + ", ".join(f"{LOOPS[key]} {row[key]['total']:.3f} s ({thousands(tokens(row[key], 'padded'))} tokens)"
                              for key in rows)
                  + f"; {agreement([row[key]['scores'] for key in rows])}; max |Δweight| "
                  + f"{max(row[key]['max_weight_difference'] for key in evaluators):.1e}")

    if args.profile:
        profile_ours(Ours(evaluators["after"], names), proposals(1, names, args.seed + 1)[0])

    summary(args, rows, setup, questions)

    load_after = _load_average()
    # This run's own threads count in it too; much above --threads means a neighbour shared the cores.
    print(f"load average (1, 5, 15 min) at the end: {load_after}")
    machine["load_average"] = {"start": load_before, "end": load_after}

    if args.json:
        args.json.write_text(json.dumps({
            "command": "bench/candidate_cost.py", "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine, "pool": pool_info, "shape": asdict(SHAPES[args.shape]) if args.shape else None,
            "pool_build_seconds": built, "setup_seconds": setup,
            "before_switches": BEFORE if args.before else None,
            "warmup_candidates": warmup, "weights": draws[warmup:], "on_disk": rows["on_disk"], "ours": rows["after"],
            "ours_before": rows.get("before"), "warmup_rows": {
                "weights": draws[:warmup], "on_disk": warm_rows["on_disk"], "ours": warm_rows["after"],
                "ours_before": warm_rows.get("before")},
        }, indent=2))


def agreement(scores: List[Dict[str, float]]) -> str:
    """`same scores (task value, ...)`, or every loop's value where they differ."""
    if all(s == scores[0] for s in scores):
        return f"same scores ({', '.join(f'{k} {v:.4f}' for k, v in scores[0].items())})"
    return "SCORES DIFFER (" + ", ".join(f"{k} " + "/".join(f"{s[k]:.4f}" for s in scores) for k in scores[0]) + ")"


def summary(args: argparse.Namespace, rows: Dict[str, List[Dict]], setup: Dict[str, float], questions: int) -> None:
    disk, after = rows["on_disk"], rows["after"]
    ours_keys = [key for key in ("before", "after") if key in rows]
    print(f"\nmedians over {args.candidates} candidates (each part is a median of its own, so parts need not add up)")
    print(f"{'seconds':72} " + " ".join(f"{LOOPS[key]:>11}" for key in rows))
    for label, disk_key, our_key in ROWS:
        cells = [f"{median(disk, disk_key):11.3f}" if disk_key else f"{'':11}"]
        cells += [f"{median(rows[key], our_key):11.3f}" if our_key else f"{'':11}" for key in ours_keys]
        print(f"{label:72} " + " ".join(cells))

    print(f"\nforward tokens per candidate ({questions} questions; real: not padding)")
    print(f"{'':72} " + " ".join(f"{LOOPS[key]:>11}" for key in rows))
    token_rows = [  # (label, per row, format)
        ("forward calls", lambda row: row["forward_calls"], "11,.0f"),
        ("padded tokens", lambda row: tokens(row, "padded"), "11,.0f"),
        ("real tokens", lambda row: tokens(row, "real"), "11,.0f"),
        ("padded tokens per question", lambda row: tokens(row, "padded") / questions, "11.1f"),
        ("real tokens per question", lambda row: tokens(row, "real") / questions, "11.1f"),
        ("padding share of the padded tokens", lambda row: 1 - tokens(row, "real") / tokens(row, "padded"), "11.1%"),
        ("forward seconds per million padded tokens", lambda row: 1e6 * row["forward"] / tokens(row, "padded"), "11.2f"),
    ]
    for label, key, spec in token_rows:
        print(f"{label:72} " + " ".join(format(median(rows[loop], key), spec) for loop in rows))
    if any("scorer_forward_stats" in r for r in after):
        mismatched = [(LOOPS[key], index, kind, tokens(r, kind), r[f"forward_{kind}"])
                      for key in ours_keys for index, r in enumerate(rows[key]) for kind in ("real", "padded")
                      if "scorer_forward_stats" in r and tokens(r, kind) != r[f"forward_{kind}"]]
        print("ours' tokens are the scorer's forward_stats(): "
              + (f"they DIFFER from the counted ones (loop, candidate, kind, scorer's, counted): {mismatched[:4]}"
                 if mismatched else "the same as the counted ones"))

    print("\nspeed-up, candidate by candidate (seconds; tokens are padded forward tokens):")
    pairs = [("on_disk", "after")] + ([("on_disk", "before"), ("before", "after")] if "before" in rows else [])
    for slow, fast in pairs:
        seconds = [a["total"] / b["total"] for a, b in zip(rows[slow], rows[fast])]
        fewer = [tokens(a, "padded") / tokens(b, "padded") for a, b in zip(rows[slow], rows[fast])]
        target = " (target >= 10x)" if slow == "on_disk" and fast == "after" else ""
        print(f"  {LOOPS[slow]} / {LOOPS[fast]}: {spread(seconds)}{target}; tokens {spread(fewer)}")
    for key in ours_keys:
        shares = [100 * row["rest"] / row["total"] for row in rows[key]]
        print(f"{LOOPS[key]}: everything-else share {spread(shares, '%')} (target <= 10%)", end="")
        saved = median(disk, "total") - median(rows[key], "total")
        print(f"; set-up ({setup[key]:.2f} s) paid back after {setup[key] / saved:.1f} candidates" if saved > 0 else "")

    scores = list(zip(*(rows[key] for key in rows)))
    same = sum(all(row["scores"] == group[0]["scores"] for row in group) for group in scores)
    worst = max(abs(row["scores"][k] - group[0]["scores"][k]) for group in scores for row in group for k in row["scores"])
    print(f"scores: identical in all {len(rows)} loops for {same} of {args.candidates} candidates (largest difference "
          f"{worst:.4f}); merged tensors differ by at most "
          f"{max(row['max_weight_difference'] for key in ours_keys for row in rows[key]):.1e}")


def profile_ours(loop: Ours, weights: List[float]) -> None:
    """Where one candidate of our loop spends its time, lm-eval's internals included."""
    profiler = cProfile.Profile()
    profiler.enable()
    row = loop.candidate(weights)
    profiler.disable()
    print(f"\nprofile of one more candidate of ours ({row['total']:.3f} s under cProfile; forward {row['forward']:.3f} s, "
          f"merge {row['merge']:.3f} s, rest {row['rest']:.3f} s):")
    for order, count in (("cumulative", 30), ("tottime", 15)):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(count)
        print(out.getvalue())


def _load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
