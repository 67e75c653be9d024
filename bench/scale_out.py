"""Scale-out on Ray: evaluations per minute for 1 and 2 Ray workers against the serial evaluator,
Ray's per-candidate overhead, and host memory per node.

    .venv/bin/python bench/scale_out.py [--candidates 24] [--workers 1 2] [--seed 0] [--work runs/scale-out]
                                        [--device cpu] [--json PATH] [--quick]

It prints, for the demo pool (small size, seed 0) and a synthetic pool of 2.65M parameters per
checkpoint:
  - one line per evaluator (serial, ray-1, ray-2) as it finishes: evaluations per minute, its
    start-up, the candidates each worker took, and its describe() line;
  - per pool: Ray's overhead with 1 worker against the target (<= 5% of a candidate), 2 workers'
    throughput over 1 worker's (target >= 1.7x on the larger pool), both as pass/FAIL, and
    whether every evaluator gave the serial evaluator's scores;
  - the load average at the start and the end, then a markdown table, one row per pool and
    evaluator: how the pool was read (kept in memory or streamed), evaluations per minute, x
    serial, x ray-1, seconds (and CPU seconds) per candidate, Ray's overhead in ms and as a share,
    host PSS in MiB (each worker + the driver = the node) and Ray's own processes.
`--quick` (8 candidates, the demo pool only) smoke-tests the script in about a minute once the
demo pool is built (building it takes 2 more). `--json PATH` also writes every measurement.

Why: `optimize --workers N` spreads each generation over N Ray actors, each with its own resident
model (mergekit_recycle/ray_evaluator.py). That pays only if N workers score nearly N times as
many candidates as one, if Ray's dispatch is small next to a candidate, and if K workers on one
node do not hold K private copies of the pool.

What: every evaluator scores the same seeded random merges (Dirichlet draws over the pool,
positive weights, scale 1) on the recipe's search split: one untimed warm-up batch (one merge per
worker, as many for all), then one timed batch of --candidates merges.
  - serial: `ResidentEvaluator` in this process's child, torch.set_num_threads(1): the baseline;
  - ray-K: `RayEvaluator.start` on a local Ray instance started for K workers of 1 CPU (1 torch
    thread) each, in a Ray temp folder of its own (so that it joins no other instance on the
    machine), and shut down after.
Each evaluator runs in a fresh interpreter, so that neither the memory nor the threads of one
leak into the next.
Evaluations per minute: the timed batch over its wall time, as the driver sees it.
Overhead: what Ray adds per candidate (dispatching the merge, returning the scores, the driver's
loop), measured with 1 worker as the driver's wall time per candidate minus the time the actor
spent in the candidate (`Outcome.seconds`); with K workers the same is K x wall per candidate
minus the actor's seconds (it then also counts a worker left idle at the end of the batch).
CPU seconds per candidate: the user and system time of the worker processes (serial: of the
evaluator's process) over the timed batch, per candidate. Next to the wall seconds it tells
contention from cost: on a machine shared with other work, workers slowed by waiting for a core
use about the CPU time one worker does.
Host memory, all on the one node: the PSS (`memory_full_info().pss`, shared pages split between
the processes sharing them) of the driver and of each worker process (the actors' pids), read
after the timed batch; Ray's own processes (raylet, GCS, idle workers) are given apart. Whether
the pool was kept in memory or streamed from the page cache is the evaluator's choice
(`describe()`): several Ray workers on one node stream.

The synthetic pool: as many checkpoints as the demo pool has, of the demo architecture
(`tiny_llama`: 4 heads, intermediate 2 x hidden) at hidden size 256 and 4 layers, each randomly
initialised (untrained: they score near chance; this measures cost, not quality), with the demo
pool's tasks and a recipe like its. Both pools are built once under --work and reused.
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTHETIC_HIDDEN, SYNTHETIC_LAYERS = 256, 4  # 2.65M parameters per checkpoint
QUICK_CANDIDATES = 8
TARGET_SPEEDUP = 1.7  # 2 workers against 1, on the larger pool
TARGET_OVERHEAD = 0.05  # Ray's share of a candidate
SCORE_TOLERANCE = 1e-6
RESULT = "RESULT "  # the line a measuring child prints its figures on
MiB = 2**20


# -- the pools ---------------------------------------------------------------------------

def demo_pool(work: Path) -> Path:
    """The demo pool at its small size, seed 0 (`mergekit-recycle demo-pool DIR --size small --seed 0`),
    built under `work` unless it is there already; its recipe."""
    from mergekit_recycle.demo_pool import build_pool

    folder = work / "demo-small-seed-0"
    build_pool(folder, seed=0, size="small", report=lambda line: print(f"  demo pool: {line}", flush=True))
    return folder / "recipe.yaml"


def synthetic_pool(work: Path, demo_recipe: Path) -> Path:
    """The larger pool (see the module docstring), built under `work` unless it is there already; its recipe."""
    from mergekit_recycle.demo_pool import char_tokenizer, read_summary, recipe_text, save_checkpoint, tiny_llama
    from mergekit_recycle.recipe import load_recipe

    folder = work / f"synthetic-h{SYNTHETIC_HIDDEN}-l{SYNTHETIC_LAYERS}"
    recipe = folder / "recipe.yaml"
    if recipe.is_file():  # written last: the pool is complete
        return recipe
    demo = demo_recipe.parent
    count = len(load_recipe(demo_recipe).pool)
    print(f"  building the synthetic pool in {folder} ({count} checkpoints)", flush=True)
    tokenizer = char_tokenizer()
    names = [f"ckpt-{index}" for index in range(1, count + 1)]
    for seed, name in enumerate(names, 1):
        save_checkpoint(tiny_llama(tokenizer, seed=seed, hidden_size=SYNTHETIC_HIDDEN, layers=SYNTHETIC_LAYERS),
                        tokenizer, folder / name)
    shutil.copytree(demo / "tasks", folder / "tasks", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    recipe.write_text("# bench/scale_out.py: untrained checkpoints, for cost only.\n"
                      + recipe_text(folder.name, names, read_summary(demo).tasks, budget=60))
    return recipe


# -- one evaluator, measured in a child process ---------------------------------------------

def merges(names: Sequence[str], count: int, seed: int) -> List[Any]:
    """`count` seeded random merges of the pool: positive weights (uniform on the simplex), scale 1."""
    import numpy as np

    from mergekit_recycle.proposal import Merge

    rng = np.random.default_rng(seed)
    return [Merge(weights=dict(zip(names, map(float, rng.dirichlet(np.ones(len(names)))))), scale=1.0)
            for _ in range(count)]


def pss(pid: int) -> Optional[int]:
    """The process's proportional set size in bytes; None when it is gone or unreadable."""
    import psutil

    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time the processes have used so far (a process gone counts nothing)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def host_memory(worker_pids: Sequence[int]) -> Dict[str, Any]:
    """PSS of this process (the driver), of each worker and of Ray's other processes (this process's
    other descendants: raylet, GCS, idle workers), in MiB."""
    import psutil

    others = [child.pid for child in psutil.Process().children(recursive=True) if child.pid not in worker_pids]
    workers = [pss(pid) for pid in worker_pids]
    if None in workers:
        raise SystemExit(f"cannot read the PSS of every worker process {list(worker_pids)}")
    return {"driver": pss(os.getpid()) / MiB, "workers": [value / MiB for value in workers],
            "ray_processes": sum(value or 0 for value in map(pss, others)) / MiB, "ray_process_count": len(others)}


def measure(name: str, recipe_path: Path, candidates: int, warmup: int, seed: int, device: str) -> Dict[str, Any]:
    """Start evaluator `name` (serial, or ray-K), score the warm-up batch, then time the batch."""
    import torch

    from mergekit_recycle.candidate import ResidentEvaluator
    from mergekit_recycle.pool import resolve_pool
    from mergekit_recycle.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    pool = resolve_pool(recipe, recipe_path)
    batch = merges(pool.names, warmup + candidates, seed)
    started = time.perf_counter()
    if name == "serial":
        evaluator = ResidentEvaluator(recipe, pool, device, recipe_path)
    else:
        from mergekit_recycle.ray_evaluator import RayEvaluator

        evaluator = RayEvaluator.start(recipe, recipe_path, pool, {}, device, workers=workers_of(name),
                                       address=None, cpus_per_worker=1, say=lambda line: print(line, file=sys.stderr))
    try:
        setup = time.perf_counter() - started
        list(evaluator.evaluate_many(batch[:warmup], "search"))
        worker_pids = [slot.pid for slot in getattr(evaluator, "slots", []) if slot.state != "lost"]
        cpu_before = cpu_seconds(worker_pids or [os.getpid()])
        started = time.perf_counter()
        outcomes = dict(evaluator.evaluate_many(batch[warmup:], "search"))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(worker_pids or [os.getpid()]) - cpu_before
        failed = [outcome.error for outcome in outcomes.values() if outcome.error]
        if failed:
            raise SystemExit(f"{len(failed)} of {candidates} candidates failed, the first: {failed[0]}")
        evaluated = Counter(outcome.worker for outcome in outcomes.values())
        return {
            "evaluator": name, "describe": evaluator.describe(), "setup_seconds": setup, "wall_seconds": wall,
            "cpu_seconds": cpu,
            "candidate_seconds": [outcomes[index].seconds for index in range(candidates)],
            "merge_seconds": [outcomes[index].evaluation.merge_seconds for index in range(candidates)],
            "objectives": [outcomes[index].evaluation.objective for index in range(candidates)],
            "per_worker": [evaluated[slot.index] for slot in getattr(evaluator, "slots", [])],
            "memory": host_memory(worker_pids),
            "pool_mib": pool.layout.nbytes * len(pool.inputs) / MiB,
            "parameters": sum(math.prod(shape) for shape in pool.layout.shapes.values()),
        }
    finally:
        if name != "serial":
            evaluator.close()


def measure_in_child(name: str, recipe: Path, args) -> Dict[str, Any]:
    """`measure` in a fresh interpreter: its figures, or exit with the tail of its errors."""
    command = [sys.executable, __file__, "--measure", name, "--recipe", str(recipe), "--candidates",
               str(args.candidates), "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device]
    # A Ray instance of its own: without RAY_ADDRESS, and with a Ray temp folder of its own, so that ray.init
    # cannot join another instance on the machine (a test's cluster, or the one a stale `ray start` recorded).
    with tempfile.TemporaryDirectory(prefix="scale-out-ray-", ignore_cleanup_errors=True) as ray_folder:
        environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        child = subprocess.run(command, capture_output=True, text=True, env={**environment, "RAY_TMPDIR": ray_folder})
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT)]
    if child.returncode or not lines:
        tail = "\n".join((child.stderr + child.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"measuring {name} on {recipe} failed (exit status {child.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT):])


# -- the figures ------------------------------------------------------------------------------

def workers_of(name: str) -> int:
    """How many workers evaluator `name` has: serial is one, ray-K is K."""
    return 1 if name == "serial" else int(name.split("-")[1])


def figures(row: Dict[str, Any], candidates: int) -> Dict[str, Any]:
    """What the table shows of one evaluator's measurement."""
    wall_per_candidate = row["wall_seconds"] / candidates
    in_actor = statistics.mean(row["candidate_seconds"])
    # Worker time per candidate not spent inside the candidate: dispatch, result, the driver's loop.
    overhead = workers_of(row["evaluator"]) * wall_per_candidate - in_actor
    memory = row["memory"]
    return {
        "per_minute": 60 * candidates / row["wall_seconds"], "candidate_seconds": in_actor,
        "candidate_cpu_seconds": row["cpu_seconds"] / candidates,
        "overhead_ms": 1000 * overhead, "overhead_share": overhead / (in_actor + overhead),
        "in_memory": "kept in memory" in row["describe"],
        "node_mib": memory["driver"] + sum(memory["workers"]), "worker_mib": memory["workers"],
        "driver_mib": memory["driver"], "ray_mib": memory["ray_processes"],
        "ray_process_count": memory["ray_process_count"],
    }


def same_scores(rows: Dict[str, Dict[str, Any]]) -> str:
    """Whether every evaluator gave the serial evaluator's objective for every candidate."""
    reference = rows["serial"]["objectives"]
    worst = max(abs(a - b) for row in rows.values() for a, b in zip(row["objectives"], reference))
    return f"{'yes' if worst <= SCORE_TOLERANCE else 'NO'} (largest difference {worst:.1e})"


def load_average() -> List[float]:
    """The machine's load over 1, 5 and 15 minutes: much above the workers means a neighbour shared the cores."""
    return [round(load, 2) for load in os.getloadavg()]


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def print_targets(label: str, rows: Dict[str, Dict[str, Any]], shown: Dict[str, Dict[str, Any]], larger: bool) -> None:
    """The pool's figures against the issue's targets (2 workers' speed-up only on the larger pool), as pass/FAIL."""
    if "ray-1" in shown:
        overhead = shown["ray-1"]
        print(f"{label}: Ray's overhead with 1 worker {overhead['overhead_ms']:.1f} ms per candidate, "
              f"{overhead['overhead_share']:.1%} of a candidate (target <= {TARGET_OVERHEAD:.0%}): "
              f"{verdict(overhead['overhead_share'] <= TARGET_OVERHEAD)}")
    if "ray-1" in shown and "ray-2" in shown:
        speedup = shown["ray-2"]["per_minute"] / shown["ray-1"]["per_minute"]
        target = f" (target >= {TARGET_SPEEDUP}x): {verdict(speedup >= TARGET_SPEEDUP)}" if larger else ""
        print(f"{label}: 2 workers / 1 worker {speedup:.2f}x{target}")
    print(f"{label}: every evaluator gave the serial evaluator's scores: {same_scores(rows)}")


def markdown_table(results: List[Tuple[str, Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]], bool]]) -> str:
    """One row per pool and evaluator; ratios against the serial evaluator and Ray with 1 worker of the same pool."""
    lines = [
        "| pool | evaluator | pool read | evals/min | × serial | × ray-1 | candidate s (CPU s) | Ray overhead ms (share) "
        "| host PSS MiB: workers + driver | Ray's own processes MiB (count) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, shown, _ in results:
        for name, row in shown.items():
            cells = [label, name, "in memory" if row["in_memory"] else "streamed", f"{row['per_minute']:.1f}",
                     f"{row['per_minute'] / shown['serial']['per_minute']:.2f}"]
            seconds = f"{row['candidate_seconds']:.3f} ({row['candidate_cpu_seconds']:.3f})"
            if name == "serial":
                cells += ["", seconds, "", f"{row['driver_mib']:.0f}", ""]
            else:
                one = f"{row['per_minute'] / shown['ray-1']['per_minute']:.2f}" if "ray-1" in shown else ""
                workers = " + ".join(f"{value:.0f}" for value in row["worker_mib"])
                cells += [one, seconds, f"{row['overhead_ms']:.1f} ({row['overhead_share']:.1%})",
                          f"{workers} + {row['driver_mib']:.0f} = {row['node_mib']:.0f}",
                          f"{row['ray_mib']:.0f} ({row['ray_process_count']})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=24, help="merges in the timed batch (2 x a population of 12)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="the Ray worker counts to measure")
    parser.add_argument("--warmup", type=int, help="merges in the untimed warm-up batch (default: the most workers)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random merges")
    parser.add_argument("--work", type=Path, default=Path("runs/scale-out"), help="where the pools are built or reused")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the serial evaluator on one GPU, each Ray worker on a GPU of its own")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CANDIDATES} candidates, the demo pool only")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # in a child: measure one evaluator
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.candidates = min(args.candidates, QUICK_CANDIDATES)
    if args.warmup is None:
        args.warmup = max(args.workers)
    if args.candidates < 1 or args.warmup < 0 or min(args.workers) < 1:
        parser.error("--candidates and --workers must be at least 1, --warmup at least 0")
    if args.measure:
        print(RESULT + json.dumps(measure(args.measure, args.recipe, args.candidates, args.warmup, args.seed,
                                          args.device)), flush=True)
        return

    load_before = load_average()
    args.work.mkdir(parents=True, exist_ok=True)
    demo = demo_pool(args.work)
    pools = [("demo (small)", demo, False)]
    if not args.quick:
        pools.append((f"synthetic {SYNTHETIC_HIDDEN}×{SYNTHETIC_LAYERS}", synthetic_pool(args.work, demo), True))
    evaluators = ["serial"] + [f"ray-{count}" for count in sorted(set(args.workers))]
    print(f"{args.candidates} timed candidates after a warm-up batch of {args.warmup}, search split, device "
          f"{args.device}, 1 torch thread per evaluator; machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {version('torch')}, ray {version('ray')}; load average at the start "
          f"{load_before}", flush=True)

    results, measured = [], {}
    for label, recipe, larger in pools:
        rows: Dict[str, Dict[str, Any]] = {}
        shown: Dict[str, Dict[str, Any]] = {}
        for name in evaluators:
            rows[name] = row = measure_in_child(name, recipe, args)
            shown[name] = figures(row, args.candidates)
            spread = f", candidates per worker {row['per_worker']}" if row["per_worker"] else ""
            print(f"{label}, {name}: {shown[name]['per_minute']:.1f} evaluations/min (start-up "
                  f"{row['setup_seconds']:.1f} s{spread}); {row['describe']}", flush=True)
        first = next(iter(rows.values()))
        size = f"{first['parameters'] / 1e6:.2f}M" if first["parameters"] >= 1e6 else f"{first['parameters'] / 1e3:.1f}k"
        label = f"{label}, {size}/ckpt"
        results.append((label, rows, shown, larger))
        measured[label] = {"recipe": str(recipe), "pool_mib": first["pool_mib"], "rows": rows, "figures": shown}

    print()
    for label, rows, shown, larger in results:
        print_targets(label, rows, shown, larger)
    load_after = load_average()
    print(f"load average (1, 5, 15 min) at the end: {load_after}\n")
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "bench/scale_out.py", "args": {key: str(value) for key, value in vars(args).items()},
            "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": version("torch"),
                        "ray": version("ray"), "load_average": {"start": load_before, "end": load_after}},
            "pools": measured,
        }, indent=2))


if __name__ == "__main__":
    main()
