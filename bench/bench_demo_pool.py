"""Headroom of the demo pool: does some merge beat the best single checkpoint on held-out data?

For each pool seed it builds (or reuses) the demo pool, then compares on the test
(holdout) tasks, all scored by lm-eval:
  - the best single post-training checkpoint, chosen by its dev macro-average;
  - the uniform soup and the greedy soup (Wortsman et al.: add checkpoints in order of
    dev score while the dev score does not drop);
  - CMA-ES over the simplex on the dev macro-average, pool only (Khalifa et al.);
  - CMA-ES with the pretraining checkpoint as anchor and `scale` searched in [0.25, 1.5]
    (theta_base + scale * sum w_i (theta_i - theta_base)); its single-checkpoint
    baseline then includes the base as well, so the comparison stays fair.
Every merge goes through mergekit's merge_state_dicts with recycle_linear. The margin's
95% interval is a paired bootstrap over test questions (resampled within each skill).

    python bench/bench_demo_pool.py --seeds 0 1 --size default --budget 80
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--size", default="default", choices=["default", "small"])
    parser.add_argument("--budget", type=int, default=80, help="CMA-ES evaluations per search")
    parser.add_argument("--pools", type=Path, default=Path("runs/bench-pools"), help="where pools are built or reused")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for scoring (training always uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_seed(seed, args) for seed in args.seeds]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def bench_seed(seed: int, args) -> dict:
    import cma
    from mergekit.merge_methods.api import merge_state_dicts
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mergekit_recycle  # noqa: F401 - registers recycle_linear
    from mergekit_recycle.demo_pool import BASE_NAME, build_pool
    from mergekit_recycle.evaluate import Scorer

    root = args.pools / f"{args.size}-seed-{seed}"
    summary = build_pool(root, seed=seed, size=args.size, report=print)
    print(f"pool {root}: content fingerprint {summary.content_fingerprint}")
    names = [name for name in summary.checkpoints if name != BASE_NAME]
    weights_of = {name: load_file(root / name / "model.safetensors") for name in summary.checkpoints}
    model = AutoModelForCausalLM.from_pretrained(root / BASE_NAME).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / BASE_NAME)
    dev = Scorer(model, tokenizer, [t.search for t in summary.tasks], [root / "tasks"])
    test = Scorer(model, tokenizer, [t.holdout for t in summary.tasks], [root / "tasks"])

    def load(weights, scale=1.0, anchored=False):
        inputs = {name: weights_of[name] for name in weights}
        parameters = {"weight": dict(weights)}
        if anchored:
            inputs[BASE_NAME] = weights_of[BASE_NAME]
            parameters["weight"][BASE_NAME] = 0.0
            parameters["scale"] = scale
        with torch.no_grad():
            merged = merge_state_dicts(inputs, "recycle_linear", parameters=parameters,
                                       base=BASE_NAME if anchored else None, dtype=torch.float32)
            model.load_state_dict(merged)

    def dev_macro() -> float:
        return float(np.mean([m["acc"] for m in dev.score().values()]))

    def test_correct() -> dict:
        scores = test.score(log_samples=True)
        return {task: np.asarray(scores.samples[task]["acc"], dtype=float) for task in scores}

    dev_scores = {name: float(np.mean([summary.scores[name][t.search] for t in summary.tasks])) for name in summary.checkpoints}
    best_post = max(names, key=dev_scores.get)
    best_any = max(summary.checkpoints, key=dev_scores.get)

    order = sorted(names, key=dev_scores.get, reverse=True)
    greedy, greedy_dev = [order[0]], dev_scores[order[0]]
    for name in order[1:]:
        load({n: 1.0 for n in greedy + [name]})
        score = dev_macro()
        if score >= greedy_dev:
            greedy, greedy_dev = greedy + [name], score

    def search(anchored: bool):
        n = len(names)
        x0 = [1.0 / n] * n + ([1.0] if anchored else [])
        es = cma.CMAEvolutionStrategy(x0, 0.25, {"seed": seed + 1, "verbose": -9, "maxfevals": args.budget})
        best = (-1.0, None)
        evaluations = 0
        while not es.stop() and evaluations < args.budget:
            candidates = es.ask()
            values = []
            for x in candidates:
                weights = {name: abs(v) + 1e-9 for name, v in zip(names, x[:n])}
                scale = float(np.clip(x[n], 0.25, 1.5)) if anchored else 1.0
                load(weights, scale, anchored)
                value = dev_macro()
                evaluations += 1
                values.append(-value)
                if value > best[0]:
                    best = (value, (weights, scale))
            es.tell(candidates, values)
        return best

    merges = {}
    for label, weights, scale, anchored in [
        ("best single (pool)", {best_post: 1.0}, 1.0, False),
        ("best single (pool+base)", {best_any: 1.0}, 1.0, False),
        ("uniform soup", {n: 1.0 for n in names}, 1.0, False),
        ("greedy soup", {n: 1.0 for n in greedy}, 1.0, False),
    ]:
        load(weights, scale, anchored)
        merges[label] = {"weights": weights, "scale": scale, "correct": test_correct()}
    t0 = time.perf_counter()
    for label, anchored in [("CMA-ES (pool)", False), ("CMA-ES (anchor+scale)", True)]:
        dev_value, (weights, scale) = search(anchored)
        load(weights, scale, anchored)
        total = sum(weights.values())
        merges[label] = {"weights": {k: round(float(v / total), 3) for k, v in weights.items()}, "scale": round(scale, 3),
                         "dev": dev_value, "correct": test_correct()}
    search_seconds = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    rows = {}
    for label, merge in merges.items():
        reference = merges["best single (pool+base)" if "anchor" in label else "best single (pool)"]["correct"]
        macro = float(np.mean([c.mean() for c in merge["correct"].values()])) * 100
        margin, low, high = paired_bootstrap(merge["correct"], reference, rng)
        rows[label] = {"test_macro": round(macro, 2), "margin": round(margin, 2), "ci95": [round(low, 2), round(high, 2)],
                       "weights": merge["weights"], "scale": merge["scale"]}
    return {"seed": seed, "size": args.size, "content_fingerprint": summary.content_fingerprint, "build_seconds": summary.build_seconds, "search_seconds": round(search_seconds, 1),
            "best_single": best_post, "best_single_with_base": best_any, "greedy": greedy, "rows": rows}


def paired_bootstrap(correct, reference, rng, iterations: int = 2000):
    """Mean and 95% interval of (macro-average of `correct`) - (that of `reference`), in points."""
    differences = {task: correct[task] - reference[task] for task in correct}
    observed = np.mean([d.mean() for d in differences.values()]) * 100
    draws = [
        np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in differences.values()]) * 100
        for _ in range(iterations)
    ]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(observed), float(low), float(high)


def print_table(results) -> None:
    print("| pool seed | merge | test macro % | margin vs best single | 95% CI |")
    print("|---|---|---|---|---|")
    for result in results:
        for label, row in result["rows"].items():
            print(f"| {result['seed']} | {label} | {row['test_macro']:.2f} | {row['margin']:+.2f} | [{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}] |")
    for result in results:
        print(f"seed {result['seed']} (pool content fingerprint {result['content_fingerprint']}): build {result['build_seconds']} s, searches {result['search_seconds']} s, "
              f"best single {result['best_single']} (with base: {result['best_single_with_base']}), greedy {result['greedy']}")
        for label in ("CMA-ES (pool)", "CMA-ES (anchor+scale)"):
            print(f"  {label}: scale {result['rows'][label]['scale']}, weights {result['rows'][label]['weights']}")


if __name__ == "__main__":
    main()
