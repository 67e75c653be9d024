"""Quality: does the optimizer's merge beat the best single checkpoint and both soups on held-out data?

This measures the claim the tool exists for. For each pool seed it builds (or reuses) the demo
pool, then for each search seed runs the real optimizer (`mergekit_recycle.optimize.optimize`,
the same code path as `mergekit-recycle optimize`) on the pool's recipe: baselines, CMA-ES on the
search (dev) tasks, the winner scored on the holdout (test) tasks. From each run's report it takes
the holdout objective of the optimized merge and of the three baselines the report names: the
best single checkpoint (chosen by its search objective), the uniform soup and the greedy soup.

The margin over the best single checkpoint also gets a 95% interval: a paired bootstrap over
holdout questions (resampled within each task, 2,000 draws), from per-question scores of the
winner as mergekit wrote it (RUN_DIR/merged) and of the best checkpoint's folder.

Runs resume: a run folder that already holds a finished run of the same recipe and seed is
replayed from its journal, not searched again (`--fresh` deletes the run folders first).

    python bench/quality.py --json runs/quality.json
    python bench/quality.py --size small --pool-seeds 0 --search-seeds 0 1 --budget 4   # smoke test
"""

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

BASELINES = ("best single", "uniform soup", "greedy soup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="default", choices=["default", "small"])
    parser.add_argument("--budget", type=int, help="evaluations per search (default: the recipe's)")
    parser.add_argument("--pools", type=Path, default=Path("runs/bench-pools"), help="where pools are built or reused")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"), help="where the run folders go")
    parser.add_argument("--fresh", action="store_true", help="delete the run folders first instead of resuming them")
    parser.add_argument("--no-ci", action="store_true", help="skip the paired-bootstrap interval")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pool training always uses 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines from the pool builds and runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = (lambda line: None) if args.quiet else print

    runs = []
    for pool_seed in args.pool_seeds:
        from mergekit_recycle.demo_pool import build_pool

        pool_dir = args.pools / f"{args.size}-seed-{pool_seed}"
        build_pool(pool_dir, seed=pool_seed, size=args.size, report=say)
        correctness = PerQuestion(pool_dir) if not args.no_ci else None
        for search_seed in args.search_seeds:
            say(f"\n== pool seed {pool_seed}, search seed {search_seed} ==")
            runs.append(run_one(pool_dir, pool_seed, search_seed, args, say, correctness))
            print(run_line(runs[-1]))

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    summary = summarise(runs)
    print(f"\nmachine: {machine['processor']}, {machine['platform']}, torch {machine['torch']}, {machine['threads']} threads")
    print(f"command: python bench/quality.py --size {args.size} --pool-seeds {' '.join(map(str, args.pool_seeds))} "
          f"--search-seeds {' '.join(map(str, args.search_seeds))}" + (f" --budget {args.budget}" if args.budget else ""))
    print()
    print(markdown(runs, summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "summary": summary}, indent=2))


def run_one(pool_dir: Path, pool_seed: int, search_seed: int, args, say, correctness) -> dict:
    from mergekit_recycle.journal import JOURNAL, Journal
    from mergekit_recycle.optimize import RunOptions, optimize
    from mergekit_recycle.recipe import load_recipe

    recipe = load_recipe(pool_dir / "recipe.yaml")
    run_dir = args.runs / f"{args.size}-pool{pool_seed}-search{search_seed}"
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    options = RunOptions(run_dir=run_dir, budget=args.budget or recipe.search.budget, seed=search_seed, device="cpu")
    started = time.perf_counter()
    report = optimize(recipe, pool_dir / "recipe.yaml", options, say=say, progress=False)
    wall = time.perf_counter() - started
    # What the run's evaluations cost, from its journal: the same whether this call ran them or replayed them.
    records = Journal(run_dir / JOURNAL, repair=False).records
    eval_seconds = sum((r.get("merge_seconds") or 0) + (r.get("eval_seconds") or 0)
                       for r in records if r.get("type") == "evaluation")

    rows = report["rows"]
    singles = [row for row in rows if row["kind"] == "checkpoint" and row["search"]]
    best = max(singles, key=lambda row: row["search"]["objective"])
    holdout = {row["kind"]: row["holdout"]["objective"] * 100 for row in rows
               if row["kind"] in ("uniform", "greedy", "optimized") and row["holdout"]}
    result = {
        "pool_seed": pool_seed, "search_seed": search_seed, "run_dir": str(run_dir),
        "evaluations": report["evaluations"], "budget": options.budget,
        "optimized": holdout.get("optimized"), "best_single": best["holdout"]["objective"] * 100,
        "best_single_name": best["name"], "uniform": holdout.get("uniform"), "greedy": holdout.get("greedy"),
        "margins": {label: None if value is None else value * 100 for label, value in report["margins"].items()},
        "ci95": None,
        "weights_above_1pct": report["winner"]["weights_above_1pct"], "checkpoints": len(report["winner"]["weights"]),
        "winner_from": report["winner"]["from"], "winner_weights": report["winner"]["weights"], "winner_scale": report["winner"]["scale"],
        "eval_seconds": round(eval_seconds, 1), "wall_seconds": round(wall, 1),
    }
    if correctness is not None:
        winner = correctness.correct(run_dir / "merged")
        reference = correctness.correct(Path(report["checkpoints"][best["name"]]))
        observed, low, high = paired_bootstrap(winner, reference, correctness.shares, np.random.default_rng(search_seed))
        result["ci95"] = [round(low, 2), round(high, 2)]
        # The interval is computed from the winner as written to disk; it should agree with the report's margin.
        result["margin_recomputed"] = round(observed, 3)
        if abs(observed - result["margins"]["best single"]) > 0.2:
            print(f"WARNING: margin over the best single recomputed from RUN_DIR/merged is {observed:+.2f}, "
                  f"the report says {result['margins']['best single']:+.2f}")
    return result


class PerQuestion:
    """Per-question holdout scores of model folders, with one lm-eval Scorer for the pool (tasks built once)."""

    def __init__(self, pool_dir: Path):
        from mergekit_recycle.recipe import load_recipe
        from mergekit_recycle.simplex import normalise

        self.recipe = load_recipe(pool_dir / "recipe.yaml")
        self.shares = dict(zip([t.holdout for t in self.recipe.tasks], normalise([t.weight for t in self.recipe.tasks])))
        self.scorer = None
        self.cache = {}

    def correct(self, folder: Path) -> dict:
        """holdout task -> per-question metric (0/1 for acc), in document order."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergekit_recycle.evaluate import Scorer, metric_name

        key = folder.resolve()
        if key not in self.cache:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            if self.scorer is None:
                self.scorer = Scorer(model, AutoTokenizer.from_pretrained(folder), list(self.shares),
                                     self.recipe.task_paths, device="cpu")
            else:
                self.scorer.model.load_state_dict(model.state_dict())
            samples = self.scorer.score(log_samples=True).samples
            self.cache[key] = {task.holdout: np.asarray(samples[task.holdout][metric_name(task.metric)], dtype=float)
                               for task in self.recipe.tasks}
        return self.cache[key]


def paired_bootstrap(correct: dict, reference: dict, shares: dict, rng, iterations: int = 2000):
    """(objective of `correct`) - (that of `reference`) in points, and its 95% interval; resampled within each task."""
    differences = {task: correct[task] - reference[task] for task in correct}
    observed = sum(shares[task] * d.mean() for task, d in differences.items()) * 100
    draws = [sum(shares[task] * d[rng.integers(0, len(d), len(d))].mean() for task, d in differences.items()) * 100
             for _ in range(iterations)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(observed), float(low), float(high)


def summarise(runs) -> dict:
    summary = {}
    for label in BASELINES:
        values = [run["margins"][label] for run in runs if run["margins"][label] is not None]
        summary[label] = {"mean": float(np.mean(values)), "worst": min(values), "best": max(values),
                          "above_0": sum(v > 0 for v in values), "runs": len(values)} if values else None
    intervals = [run["ci95"] for run in runs if run["ci95"]]
    if summary["best single"] and intervals:
        summary["best single"]["ci_above_0"] = sum(low > 0 for low, _ in intervals)
    summary["mean_weights_above_1pct"] = float(np.mean([run["weights_above_1pct"] for run in runs]))
    return summary


def _points(value, sign: bool = False) -> str:
    return "—" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"


def run_line(run) -> str:
    margins = ", ".join(f"{label} {_points(run['margins'][label], True)}" for label in BASELINES)
    ci = f" [{run['ci95'][0]:+.2f}, {run['ci95'][1]:+.2f}]" if run["ci95"] else ""
    return (f"pool {run['pool_seed']} search {run['search_seed']}: optimized {_points(run['optimized'])} on holdout; "
            f"margins vs {margins}{ci}; winner found as {run['winner_from']}; {run['weights_above_1pct']}/{run['checkpoints']} weights > 1%; "
            f"{run['evaluations']} evaluations, {run['eval_seconds']} s evaluating, {run['wall_seconds']} s this call")


def markdown(runs, summary) -> str:
    lines = ["Holdout objective (%) and margins of the optimized merge (points):", "",
             "| pool seed | search seed | evals | optimized | best single | uniform | greedy | vs best single | 95% CI "
             "| vs uniform | vs greedy | weights > 1% | found as | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        m = run["margins"]
        ci = f"[{run['ci95'][0]:+.2f}, {run['ci95'][1]:+.2f}]" if run["ci95"] else "—"
        lines.append(
            f"| {run['pool_seed']} | {run['search_seed']} | {run['evaluations']} | {_points(run['optimized'])} "
            f"| {_points(run['best_single'])} ({run['best_single_name']}) | {_points(run['uniform'])} | {_points(run['greedy'])} "
            f"| {_points(m['best single'], True)} | {ci} | {_points(m['uniform soup'], True)} | {_points(m['greedy soup'], True)} "
            f"| {run['weights_above_1pct']}/{run['checkpoints']} | {run['winner_from']} | {run['eval_seconds']:.0f} |")
    lines += ["", "| margin over | mean | worst | best | runs > 0 |", "|---|---|---|---|---|"]
    for label in BASELINES:
        s = summary[label]
        if s is None:
            lines.append(f"| {label} | — | — | — | — |")
            continue
        above = f"{s['above_0']} of {s['runs']}" + (f" (95% CI > 0: {s['ci_above_0']})" if "ci_above_0" in s else "")
        lines.append(f"| {label} | {s['mean']:+.2f} | {s['worst']:+.2f} | {s['best']:+.2f} | {above} |")
    lines += ["", f"Mean weights above 1%: {summary['mean_weights_above_1pct']:.1f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
