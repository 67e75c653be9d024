"""Quality across pool designs: does the chosen model beat the best checkpoint and both soups on held-out data?

This measures the claim the tool exists for, on pools built to differ (`demo-pool --design`):
forgetting, complementary experts, a training trajectory, one dominant checkpoint (no
headroom), one broken checkpoint among good ones, near-equal checkpoints that tie (close), and
another architecture. For every
design, pool seed and search seed it runs the real optimizer (`mergekit_recycle.optimize.optimize`,
the code path of `mergekit-recycle optimize`) twice on the pool's recipe:

  plain    `selection.holdback: 0`: the best merge on the search (dev) tasks wins (the rule
           before robust selection);
  robust   the recipe's default selection: 30% of each dev task held back from CMA-ES, the
           finalists and every baseline scored on it, and a finalist replaces the best
           baseline only on a corrected paired-bootstrap win (see selection.py);

and once more as an **oracle**: CMA-ES searching the holdout (test) tasks themselves. The
oracle's headroom, its best test objective minus the best checkpoint's, says how much a pool
has to give; it is reported, never used to choose.

Margins are holdout (test) objective differences in points, chosen model minus baseline,
where the checkpoint to beat is the one best **on holdout**. Intervals are paired bootstraps
over test documents (2,000 draws, within each task), from the report (`report.json`'s
`comparison`). From the robust run's journal it also replays the choice at other confidence
levels (and with a plain comparison, `point`) and scores each choice on the holdout tasks,
so the rule's setting can be compared on the same searches.

Runs resume: a run folder that already holds a finished run is replayed from its journal.

    python bench/quality.py --json runs/quality.json                                   # every design, seeds 0 1
    python bench/quality.py --designs forgetting --size small --pool-seeds 0 --budget 8   # smoke test
    python bench/quality.py --tables runs/a.json runs/b.json                           # runs measured apart, in one table
"""

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import yaml

CONFIDENCES = (0.0, 0.5, 0.8, 0.95)
LABELS = ("best checkpoint", "uniform soup", "greedy soup")


def main() -> None:
    from mergekit_recycle.demo_pool import DESIGNS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--pool-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--size", default="default", choices=["default", "small"])
    parser.add_argument("--budget", type=int, help="evaluations per search (default: the recipe's)")
    parser.add_argument("--pools", type=Path, default=Path("runs/bench-pools"), help="where pools are built or reused")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"), help="where the run folders go")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pool training always uses 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines from the pool builds and runs")
    parser.add_argument("--tables", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: print the tables of the results in these --json files, together")
    args = parser.parse_args()
    if args.tables:
        print(markdown([run for path in args.tables for run in json.loads(path.read_text())["runs"]]))
        return
    torch.set_num_threads(args.threads)
    say = (lambda line: None) if args.quiet else print

    results = []
    for design in args.designs:
        for pool_seed in args.pool_seeds:
            results += bench_pool(design, pool_seed, args, say)
            if args.json:  # as it goes: a long benchmark that stops keeps what it measured
                write_json(args, results)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.platform()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(markdown(results))
    if args.json:
        write_json(args, results)


def write_json(args, results) -> None:
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                     "runs": results, "summary": summarise(results)}, indent=2))


def bench_pool(design: str, pool_seed: int, args, say) -> List[dict]:
    from mergekit_recycle.demo_pool import build_pool

    pool_dir = (args.pools / f"{design}-{args.size}-seed-{pool_seed}").resolve()
    summary = build_pool(pool_dir, seed=pool_seed, size=args.size, design=design, report=say)
    base = yaml.safe_load((pool_dir / "recipe.yaml").read_text())
    # Absolute paths: the variants' recipes live in the run folders, not in the pool.
    base["pool"] = [{"path": str(pool_dir / entry["path"])} for entry in base["pool"]]
    base["task_paths"] = [str(pool_dir / path) for path in base["task_paths"]]
    if args.budget:
        base["search"]["budget"] = args.budget
    folder = args.runs / f"{design}-{args.size}-seed-{pool_seed}"
    oracle = run(folder / "oracle", oracle_recipe(base), 0, say)
    headroom = oracle_headroom(oracle["report"])
    results = []
    for search_seed in args.search_seeds:
        plain = run(folder / f"plain-search{search_seed}", with_selection(base, holdback=0.0), search_seed, say)
        robust = run(folder / f"robust-search{search_seed}", base, search_seed, say)
        result = {"design": design, "pool_seed": pool_seed, "search_seed": search_seed,
                  "pool_fingerprint": summary.fingerprint, "pool_content": summary.content_fingerprint, "headroom": headroom,
                  "oracle_seconds": oracle["seconds"],
                  "plain": outcome(plain), "robust": outcome(robust),
                  "replayed": replay_choices(robust, args)}
        results.append(result)
        print(run_line(result))
    return results


def with_selection(recipe: dict, **selection) -> dict:
    return {**recipe, "selection": {**recipe.get("selection", {}), **selection}}


def oracle_recipe(recipe: dict) -> dict:
    """CMA-ES on the holdout tasks themselves (search and holdout swapped): how much there is to find."""
    tasks = [{**task, "search": task["holdout"], "holdout": task["search"]} for task in recipe["tasks"]]
    return with_selection({**recipe, "tasks": tasks}, holdback=0.0)


def oracle_headroom(report: dict) -> float:
    """Points between the oracle's best merge and the best checkpoint, both on the holdout (its search) tasks."""
    rows = report["rows"]
    best_single = max(row["search"]["objective"] for row in rows if row["kind"] == "checkpoint" and row["search"])
    best = max(row["search"]["objective"] for row in rows if row["search"])
    return round((best - best_single) * 100, 2)


def run(run_dir: Path, data: dict, seed: int, say) -> dict:
    from mergekit_recycle.optimize import RunOptions, optimize
    from mergekit_recycle.recipe import load_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir.parent / f"{run_dir.name}.yaml"
    text = yaml.safe_dump(data, sort_keys=False)
    if not source.is_file() or source.read_text() != text:
        source.write_text(text)
    recipe = load_recipe(source)
    options = RunOptions(run_dir=run_dir.resolve(), budget=recipe.search.budget, seed=seed, device="cpu")
    say(f"\n== {run_dir} ==")
    started = time.perf_counter()
    report = optimize(recipe, source, options, say=say, progress=False)
    return {"run_dir": run_dir, "recipe": recipe, "source": source, "report": report,
            "seconds": round(time.perf_counter() - started, 1)}


def outcome(result: dict) -> dict:
    """What a run's report says of its winner against the baselines, in points."""
    report = result["report"]
    comparison = report["comparison"]
    margins = {}
    for label in LABELS:
        entry = comparison["margins"][label]
        margins[label] = None if entry is None else {
            "name": entry["name"], "margin": round(entry["margin"] * 100, 2),
            "ci": [round(entry["low"] * 100, 2), round(entry["high"] * 100, 2)] if entry["low"] is not None else None}
    optimized = next(row for row in report["rows"] if row["kind"] == "optimized")
    return {"winner": report["winner"]["from"], "kind": report["winner"]["kind"],
            "holdout": round(optimized["holdout"]["objective"] * 100, 2), "margins": margins,
            "beaten": comparison["beaten"], "checkpoints": comparison["checkpoints"],
            "weights_above_1pct": report["winner"]["weights_above_1pct"],
            "reason": report.get("selection", {}).get("reason"), "seconds": result["seconds"]}


def replay_choices(robust: dict, args) -> Dict[str, dict]:
    """The robust run's choice at other confidence levels (and `point`: a plain comparison), each scored on holdout."""
    from mergekit_recycle.candidate import ResidentEvaluator
    from mergekit_recycle.journal import Journal
    from mergekit_recycle.pool import resolve_pool
    from mergekit_recycle.proposal import Merge
    from mergekit_recycle.records import EvaluationRecord, SelectionRecord
    from mergekit_recycle.run_folder import JOURNAL
    from mergekit_recycle.selection import Contender, choose, interval

    recipe, journal = robust["recipe"], Journal(robust["run_dir"] / JOURNAL, repair=False)
    selection = journal.of_type(SelectionRecord)[-1]
    evaluations = [r for r in journal.of_type(EvaluationRecord) if r.ok]
    by_key = {(r.key, r.split): r for r in evaluations}
    chosen = {r.name: r for r in evaluations if r.split == "selection"}
    names = [r.name for r in chosen.values() if r.kind != "finalist"] + selection.finalists
    contenders, merges = {}, {}
    for name in names:
        record = chosen[name]
        searched = by_key.get((record.key, "search"))
        kind = "proposal" if record.kind == "finalist" else record.kind
        contenders[name] = Contender(name, kind, searched.objective if searched else None, record.objective,
                                     record.documents)
        merges[name] = Merge(weights=record.weights, scale=record.scale)
    baselines = [c for c in contenders.values() if c.kind not in ("proposal",)]
    finalists = [contenders[name] for name in selection.finalists if name in contenders]
    shares = recipe.shares()
    decisions = {f"confidence {c}": choose(baselines, finalists, shares, recipe.selection.holdback, c).winner
                 for c in CONFIDENCES}
    point = choose(baselines, finalists, shares, recipe.selection.holdback, 0.5)
    decisions["point"] = point.challenger if point.margin is not None and point.margin > 0 else point.reference

    holdout = {r.name: r for r in evaluations if r.split == "holdout" and r.kind in ("checkpoint", "uniform", "greedy")}
    singles = [r for r in holdout.values() if r.kind == "checkpoint"]
    best = max(singles, key=lambda r: r.objective)
    evaluator = None
    replayed = {}
    for label, name in decisions.items():
        merge = merges[name]
        scored = by_key.get((merge.key, "holdout"))
        if scored is None or scored.documents is None:
            if evaluator is None:
                pool = resolve_pool(recipe, robust["source"])
                evaluator = ResidentEvaluator(recipe, pool, "cpu", robust["source"])
            scored = evaluator.evaluate(merge, "holdout")  # an Evaluation: objective and documents, as a record has
        margin = interval(scored.documents, best.documents, shares, scored.objective - best.objective)
        replayed[label] = {"winner": name, "holdout": round(scored.objective * 100, 2),
                           "vs_best_checkpoint": round(margin.margin * 100, 2),
                           "ci": [round(margin.low * 100, 2), round(margin.high * 100, 2)] if margin.low is not None else None}
    return replayed


def summarise(results: List[dict]) -> Dict[str, dict]:
    """Per design: mean and worst margins of each rule, runs significantly below the best checkpoint, headroom."""
    summary = {}
    for design in dict.fromkeys(r["design"] for r in results):
        runs = [r for r in results if r["design"] == design]
        entry = {"runs": len(runs), "headroom": float(np.mean([r["headroom"] for r in runs]))}
        for rule in ("plain", "robust"):
            for label in LABELS:
                values = [r[rule]["margins"][label]["margin"] for r in runs if r[rule]["margins"][label]]
                entry[f"{rule} {label} mean"] = round(float(np.mean(values)), 2) if values else None
                entry[f"{rule} {label} worst"] = min(values) if values else None
            below = [r for r in runs if (ci := r[rule]["margins"]["best checkpoint"]["ci"]) and ci[1] < 0]
            above = [r for r in runs if (ci := r[rule]["margins"]["best checkpoint"]["ci"]) and ci[0] > 0]
            entry[f"{rule} significantly below"] = len(below)
            entry[f"{rule} significantly above"] = len(above)
            entry[f"{rule} weights above 1%"] = float(np.mean([r[rule]["weights_above_1pct"] for r in runs]))
            entry[f"{rule} baseline kept"] = sum(1 for r in runs if r[rule]["kind"] in ("checkpoint", "uniform", "greedy"))
        for label in [*(f"confidence {c}" for c in CONFIDENCES), "point"]:
            entry[f"{label} mean"] = round(float(np.mean([r["replayed"][label]["vs_best_checkpoint"] for r in runs])), 2)
        summary[design] = entry
    return summary


def _ci(ci: Optional[list]) -> str:
    return "—" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def run_line(result: dict) -> str:
    parts = []
    for rule in ("plain", "robust"):
        o = result[rule]
        best = o["margins"]["best checkpoint"]
        parts.append(f"{rule}: {o['winner']} ({o['kind']}) {o['holdout']:.2f}, vs {best['name']} {best['margin']:+.2f} "
                     f"{_ci(best['ci'])}")
    return (f"{result['design']} pool {result['pool_seed']} ({result.get('pool_content')}) search {result['search_seed']}: headroom "
            f"{result['headroom']:+.2f}; " + "; ".join(parts))


def _margin(o: dict, label: str) -> str:
    entry = o["margins"][label]
    return "—" if entry is None else f"{entry['margin']:+.2f}"


def markdown(results: List[dict]) -> str:
    lines = ["Per run: holdout objective (%) of the chosen model and its margin (points) over the checkpoint best on "
             "holdout, with the paired 95% interval; then over the uniform and the greedy soup.", "",
             "| design | pool seed | search seed | oracle headroom | rule | chosen | holdout | vs best checkpoint (name) "
             "| 95% CI | vs uniform | vs greedy | weights > 1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for rule in ("plain", "robust"):
            o = r[rule]
            best = o["margins"]["best checkpoint"]
            lines.append(f"| {r['design']} | {r['pool_seed']} | {r['search_seed']} | {r['headroom']:+.2f} | {rule} "
                         f"| {o['winner']} | {o['holdout']:.2f} | {best['margin']:+.2f} ({best['name']}) | {_ci(best['ci'])} "
                         f"| {_margin(o, 'uniform soup')} | {_margin(o, 'greedy soup')} "
                         f"| {o['weights_above_1pct']}/{o['checkpoints']} |")
    pools = dict.fromkeys(f"{r['design']} seed {r['pool_seed']}: {r.get('pool_content') or 'not recorded'}" for r in results)
    lines += ["", "Pools (content fingerprint): " + "; ".join(pools) + "."]
    summary = summarise(results)
    lines += ["", "Per design (means over seeds; margins in points over the checkpoint best on holdout unless named):", "",
              "| design | runs | oracle headroom | rule | vs best checkpoint: mean (worst) | runs with CI below 0 "
              "| vs uniform soup: mean (worst) | vs greedy soup: mean (worst) | winner is a baseline | weights > 1% |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for design, s in summary.items():
        for rule in ("plain", "robust"):
            cells = [f"{s[f'{rule} {label} mean']:+.2f} ({s[f'{rule} {label} worst']:+.2f})" for label in LABELS]
            lines.append(f"| {design} | {s['runs']} | {s['headroom']:+.2f} | {rule} | {cells[0]} "
                         f"| {s[f'{rule} significantly below']} | {cells[1]} | {cells[2]} "
                         f"| {s[f'{rule} baseline kept']} of {s['runs']} | {s[f'{rule} weights above 1%']:.1f} |")
    lines += ["", "The robust run's choice replayed at other settings (mean margin over the best checkpoint on holdout):", "",
              "| design | " + " | ".join([*(f"confidence {c}" for c in CONFIDENCES), "point"]) + " |",
              "|---|" + "---|" * (len(CONFIDENCES) + 1)]
    for design, s in summary.items():
        lines.append(f"| {design} | " + " | ".join(f"{s[f'{label} mean']:+.2f}" for label in
                                                   [*(f"confidence {c}" for c in CONFIDENCES), "point"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
