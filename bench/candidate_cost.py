"""Per-candidate cost of our resident evaluation loop against mergekit-evolve's on-disk loop.

    .venv/bin/python bench/candidate_cost.py [--recipe recipes/pool.yaml | --synthetic HIDDEN LAYERS]
                                             [--candidates 6] [--seed 0] [--threads 2] [--warmup 1]
                                             [--json PATH] [--profile]

Why: a search scores many candidates, so what one candidate costs decides how far a budget
goes. mergekit-evolve's on-disk loop (its `OnDiskMergeEvaluator`) writes every candidate to a
folder with `run_merge`, loads it back through `lm_eval.simple_evaluate` and deletes it. Ours
(`ResidentEvaluator`) builds the model, the lm-eval tasks and the HFLM once, then per candidate
copies the merged tensors into the resident model and runs lm-eval's `evaluate` on it.

What: both loops score the same candidates (seeded Dirichlet draws over the recipe's pool) on the
recipe's search tasks, with the same batch size, on the CPU, in float32. They run candidate by
candidate in one process, alternating which goes first, so that load from a neighbour on the
machine hits both alike; `--warmup` candidates are run through both first and not counted.
  - ours: the `evaluate` call, split as the issue asks into the merge (`Evaluation.merge_seconds`),
    forward passes (time inside the model's forward) and everything else (the difference);
  - the baseline, built as mergekit-evolve builds it (mergekit.evo.helpers imports ray, which is
    not installed, so its merge_model / evaluate_model are restated here): `ModelGenome` with
    merge_method linear -> `genotype_merge_config` (its hard-coded bfloat16 set to float32) ->
    `run_merge` into a temp folder with mergekit-evolve's MergeOptions (tokenizer copied) ->
    `simple_evaluate(model="hf", ...)` on that folder (TaskManager built once) -> delete it.
Inside lm-eval, both loops' time is further split by class-level timers: building requests,
tokenizing, forward passes, batching, per-document results, and for the baseline loading the
model, building the tasks and lm-eval's environment report.

`--synthetic HIDDEN LAYERS` (e.g. `--synthetic 512 8`) runs the same comparison on a bigger pool,
to show how both loops' costs move with checkpoint size: 8 checkpoints with the demo pool's
tokenizer and architecture (`tiny_llama`: 4 heads, intermediate size 2 x hidden) at that size, each
with its own random weights (untrained, so they score near chance: this measures cost, not
quality), the demo's lm-eval tasks (copied from .toy-pool/tasks, which `make demo` builds) and a
recipe like recipes/pool.yaml, all in a temporary folder deleted at exit.

It checks that both loops give the same search scores and the same merged tensors for every
candidate. Figures are medians over the candidates; speed is given as ratios against the
baseline of the same run, with absolute seconds to size them.
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
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

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
from mergekit_recycle.demo_pool import char_tokenizer, save_checkpoint, tiny_llama
from mergekit_recycle.evaluate import quiet_lm_eval
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe
from mergekit_recycle.evaluate import PreparedLoglikelihoods
from transformers import LlamaForCausalLM

BATCH_SIZE = 256  # ResidentEvaluator's default; the baseline is given the same
DEMO_TASKS = Path(__file__).resolve().parent.parent / ".toy-pool" / "tasks"  # built by `make demo`
SYNTHETIC_CHECKPOINTS = 8
TASKS = ("add", "sort", "shift")  # the demo's: toy_<name>_dev searched, toy_<name>_test held out


def synthetic_pool(folder: Path, hidden: int, layers: int) -> Path:
    """Build the `--synthetic` pool in `folder` and return its recipe: 8 randomly initialised
    checkpoints of the demo architecture at this size, the demo's tasks and a recipe over them."""
    if not (DEMO_TASKS / "toy_add_dev.yaml").is_file():
        raise SystemExit(f"--synthetic needs the demo's lm-eval tasks in {DEMO_TASKS}; run `make demo` first")
    tokenizer = char_tokenizer()
    entries = []
    for i in range(1, SYNTHETIC_CHECKPOINTS + 1):
        model = tiny_llama(tokenizer, seed=i, hidden_size=hidden, layers=layers)
        save_checkpoint(model, tokenizer, folder / f"ckpt-{i}")
        entries.append(f"  - path: ckpt-{i}")
        del model
    shutil.copytree(DEMO_TASKS, folder / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    tasks = [
        f"  - name: {name}\n    search: toy_{name}_dev\n    holdout: toy_{name}_test\n    metric: acc\n    weight: 1.0"
        for name in TASKS
    ]
    recipe = folder / "recipe.yaml"
    recipe.write_text("\n".join([
        f"# bench/candidate_cost.py --synthetic {hidden} {layers}: untrained checkpoints, for cost only.",
        f"name: synthetic-h{hidden}-l{layers}",
        "pool:", *entries,
        "base: null",
        "tasks:", *tasks,
        "task_paths: [tasks]",
        "search: {budget: 60, population: null, sigma0: 0.25, seed: 0, scale: 1.0}",
        "merge: {dtype: float32, device: auto}",
        "output: {run_dir: runs/synthetic, hub_repo: null, private: true}",
        "",
    ]))
    return recipe


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


watch(LlamaForCausalLM, "forward", "forward")  # the model's forward passes, in either loop
watch(PreparedLoglikelihoods, "score", "prepared")  # ours: batching, forward, log-softmax, greedy check
watch(HFLM, "_loglikelihood_tokens", "loglikelihood_tokens")  # batching, forward, log-softmax, greedy check
watch(TemplateLM, "loglikelihood", "loglikelihood")  # tokenizing, then _loglikelihood_tokens
watch(Task, "build_all_requests", "build_requests")  # renders every document's prompt and choices
watch(ConfigurableTask, "process_results", "process_results")  # per document, from its log-likelihoods
watch(HFLM, "__init__", "load_model")
watch(TaskManager, "load", "build_tasks")
for _name in ("add_env_info", "get_git_commit_hash", "add_tokenizer_info"):  # once per simple_evaluate
    watch(lm_eval.evaluator, _name, "env_report")


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


def proposals(count: int, names: List[str], seed: int) -> List[List[float]]:
    """`count` weight vectors over the pool: uniform draws from the simplex."""
    rng = np.random.default_rng(seed)
    return [[float(w) for w in rng.dirichlet(np.ones(len(names)))] for _ in range(count)]


def ours(evaluator: ResidentEvaluator, names: List[str], weights: List[float]) -> Dict:
    """One candidate of our loop: total = merge + forward + rest (the issue's split)."""
    reset_watches()
    start = time.perf_counter()
    evaluation = evaluator.evaluate(Merge(weights=dict(zip(names, weights)), scale=1.0), "search")
    total = time.perf_counter() - start
    parts = lm_eval_parts()
    rest = total - evaluation.merge_seconds - parts["forward"]
    return {
        "total": total, "merge": evaluation.merge_seconds, "eval": evaluation.eval_seconds, **parts, "rest": rest,
        "other": evaluation.eval_seconds - sum(parts.values()),
        "scores": dict(evaluation.scores),
    }


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

    def config(self, weights: List[float]):
        genotype = torch.tensor(weights, dtype=torch.float32)  # (models,) -> (1 layer group, models, 1, 1)
        config = self.genome.genotype_merge_config(genotype)
        return config.model_copy(update={"dtype": "float32"})  # the genome hard-codes bfloat16

    def candidate(self, weights: List[float]) -> Tuple[Dict, Dict[str, torch.Tensor]]:
        """One candidate: total = merge (genotype -> config -> run_merge) + eval (simple_evaluate) + cleanup.
        Also returns the merged tensors, read back untimed, to check against our merge."""
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
        tensors = {}  # untimed
        for shard in out.glob("*.safetensors"):
            tensors.update(load_file(str(shard)))
        cleanup_start = time.perf_counter()
        shutil.rmtree(out)
        end = time.perf_counter()
        return {
            "total": (evaluated - start) + (end - cleanup_start), "merge": merged - start, "eval": evaluated - merged,
            "cleanup": end - cleanup_start, **parts, "other": (evaluated - merged) - sum(parts.values()),
            "scores": {task.name: float(results["results"][name]["acc,none"]) for name, task in self.tasks.items()},
        }, tensors


def max_difference(model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> float:
    state = model.state_dict()
    return max(float((tensor.float() - state[name].float()).abs().max()) for name, tensor in tensors.items())


def median(rows: List[Dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


ROWS = [  # (label, key in the on-disk rows or None, key in our rows or None)
    ("per candidate", "total", "total"),
    ("merge (ours: into the resident model; on-disk: run_merge to a folder)", "merge", "merge"),
    ("lm-eval (ours: evaluate; on-disk: simple_evaluate on the folder)", "eval", "eval"),
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
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"),
                        help="instead of --recipe, a temporary pool of 8 random checkpoints of the demo "
                             "architecture with this hidden size and number of layers")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed candidates run through both loops first")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one more candidate of our loop and print where its time goes")
    args = parser.parse_args()
    if args.synthetic:
        hidden, layers = args.synthetic
        if hidden < 8 or hidden % 8 or layers < 1:  # 4 heads of an even head size (rotary embeddings)
            parser.error("--synthetic: HIDDEN must be a positive multiple of 8 and LAYERS at least 1")
        if args.recipe is not None:
            parser.error("--synthetic builds its own recipe; leave out --recipe")
    elif args.recipe is None:
        args.recipe = Path("recipes/pool.yaml")

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    quiet_lm_eval()
    with contextlib.ExitStack() as stack:
        built = None
        if args.synthetic:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="candidate-cost-pool-")))
            start = time.perf_counter()
            args.recipe = synthetic_pool(folder, *args.synthetic)
            built = time.perf_counter() - start
        compare(args, built)


def compare(args: argparse.Namespace, built) -> None:
    load_before = _load_average()
    recipe = load_recipe(args.recipe)
    # Both loops score every document of the search tasks: the on-disk loop knows nothing of the
    # documents a recipe holds back for choosing the winner (selection.holdback).
    recipe = recipe.model_copy(update={"selection": recipe.selection.model_copy(update={"holdback": 0.0})})
    if recipe.merge.dtype != "float32":
        raise SystemExit(f"the benchmark compares float32 merges; {args.recipe} asks for {recipe.merge.dtype}")
    pool = resolve_pool(recipe, args.recipe)
    names = pool.names
    draws = proposals(args.warmup + args.candidates, names, args.seed)

    start = time.perf_counter()
    evaluator = ResidentEvaluator(recipe, pool, device="cpu", source=args.recipe, batch_size=BATCH_SIZE)
    setup = time.perf_counter() - start
    params = sum(p.numel() for p in evaluator.model.parameters())
    config = evaluator.model.config
    pool_info = {
        "source": f"synthetic {args.synthetic[0]} {args.synthetic[1]}" if args.synthetic else str(args.recipe),
        "checkpoints": len(names), "parameters": params, "checkpoint_bytes": pool.layout.nbytes,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "layers": config.num_hidden_layers, "heads": config.num_attention_heads, "vocab_size": config.vocab_size,
    }
    questions = sum(len(list(task.eval_docs)) for task in evaluator.scorers["search"].task_dict.values())

    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "lm_eval": lm_eval.__version__, "mergekit": _version("mergekit"),
        "transformers": _version("transformers"),
    }
    print(f"load average (1, 5, 15 min) at the start: {load_before}")
    if args.synthetic:
        print(f"synthetic pool: {len(names)} untrained checkpoints built in {built:.1f} s in {args.recipe.parent} "
              "(deleted at exit)")
    size = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params / 1e3:.1f}k"
    print(f"pool: {len(names)} checkpoints of {size} parameters, {pool.layout.nbytes / 1e6:.2f} MB each "
          f"(hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads, vocab {config.vocab_size}; {pool_info['source']}); search tasks "
          f"{', '.join(t.search for t in recipe.tasks)} ({questions} questions), batch size {BATCH_SIZE}")
    print(f"machine: {machine['platform']}, {machine['processor']}, {machine['cores']} cores, python {machine['python']}, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}, "
          f"lm-eval {machine['lm_eval']}, mergekit {machine['mergekit']}")
    print(f"our one-off set-up (resident model, merger, search and holdout scorers): {setup:.2f} s")

    ours_rows, disk_rows = [], []
    with tempfile.TemporaryDirectory(prefix="candidate-cost-") as tmp:
        disk = OnDisk(recipe, pool, Path(tmp))
        for index, weights in enumerate(draws):
            # Alternate which loop goes first, so that neither always runs on caches the other warmed.
            if index % 2:
                a = ours(evaluator, names, weights)
                b, tensors = disk.candidate(weights)
            else:
                b, tensors = disk.candidate(weights)
                a = ours(evaluator, names, weights)
            b["max_weight_difference"] = max_difference(evaluator.model, tensors)  # the resident model holds ours
            warm = index < args.warmup
            if not warm:
                ours_rows.append(a)
                disk_rows.append(b)
            b_scores = b["scores"]
            agree = "same scores" if a["scores"] == b_scores else "SCORES DIFFER"
            print(f"{'warm-up' if warm else 'candidate'} {index}: ours {a['total']:.3f} s, on-disk {b['total']:.3f} s; "
                  f"{agree} ({', '.join(f'{k} {v:.4f}/{b_scores[k]:.4f}' for k, v in a['scores'].items())}); "
                  f"max |Δweight| {b['max_weight_difference']:.1e}")

    if args.profile:
        profile_ours(evaluator, names, proposals(1, names, args.seed + 1)[0])

    baseline = median(disk_rows, "total")
    print(f"\nmedians over {args.candidates} candidates (each part is a median of its own, so parts need not add up)")
    print(f"{'':72} {'on-disk s':>9} {'ours s':>9} {'ours/on-disk total':>19}")
    for label, disk_key, our_key in ROWS:
        left = f"{median(disk_rows, disk_key):9.3f}" if disk_key else f"{'':9}"
        right = f"{median(ours_rows, our_key):9.3f} {median(ours_rows, our_key) / baseline:19.3f}" if our_key else ""
        print(f"{label:72} {left} {right}")
    speedups = [b["total"] / a["total"] for a, b in zip(ours_rows, disk_rows)]
    shares = [a["rest"] / a["total"] for a in ours_rows]
    print(f"\nspeed-up (on-disk / ours, candidate by candidate): median {statistics.median(speedups):.2f}x, "
          f"range {min(speedups):.2f}-{max(speedups):.2f}x (target >= 10x)")
    print(f"our everything-else share: median {statistics.median(shares):.1%}, range {min(shares):.1%}-{max(shares):.1%} "
          f"(target <= 10%)")
    saved = baseline - median(ours_rows, "total")
    if saved > 0:
        print(f"our set-up ({setup:.2f} s) is paid back after {setup / saved:.1f} candidates")
    same = sum(a["scores"] == b["scores"] for a, b in zip(ours_rows, disk_rows))
    worst = max(abs(a["scores"][k] - b["scores"][k]) for a, b in zip(ours_rows, disk_rows) for k in a["scores"])
    print(f"scores: identical for {same} of {args.candidates} candidates (largest difference {worst:.4f}); "
          f"merged tensors differ by at most {max(b['max_weight_difference'] for b in disk_rows):.1e}")

    load_after = _load_average()
    # This run's own threads count in it too; much above --threads means a neighbour shared the cores.
    print(f"load average (1, 5, 15 min) at the end: {load_after}")
    machine["load_average"] = {"start": load_before, "end": load_after}

    if args.json:
        args.json.write_text(json.dumps({
            "command": "bench/candidate_cost.py", "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine, "pool": pool_info, "pool_build_seconds": built, "setup_seconds": setup,
            "weights": draws[args.warmup:], "ours": ours_rows, "on_disk": disk_rows,
        }, indent=2))


def profile_ours(evaluator: ResidentEvaluator, names: List[str], weights: List[float]) -> None:
    """Where one candidate of our loop spends its time, lm-eval's internals included."""
    profiler = cProfile.Profile()
    profiler.enable()
    row = ours(evaluator, names, weights)
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
