"""Merge speed of recycle_linear against mergekit's own `linear`, measured in one run.

    .venv/bin/python bench/bench_merge.py [--models 8] [--hidden 256] [--layers 4] [--repeats 3]

Three comparisons, each a ratio against a baseline timed in the same process:
  1. to disk through run_merge: recycle_linear vs linear, all weights positive;
  2. to disk with most weights 0: `mergekit-recycle merge` (zero-weight models dropped before
     planning) vs run_merge with linear (which reads every model);
  3. in memory through merge_state_dicts: recycle_linear vs linear.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

import mergekit_recycle  # noqa: F401 - registers recycle_linear
from mergekit_recycle import demo_pool
from mergekit_recycle.merge import merge_yaml

OPTIONS = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False)


def median_seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def config(method: str, paths, weights) -> dict:
    return {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)],
        "dtype": "float32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = demo_pool.char_tokenizer()
        paths = []
        for i in range(args.models):
            model = demo_pool.tiny_llama(tokenizer, seed=i, hidden_size=args.hidden, layers=args.layers)
            paths.append(demo_pool.save_checkpoint(model, tokenizer, root / f"m{i}"))
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.models} checkpoints of {params / 1e6:.2f}M parameters; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}; median of {args.repeats}")

        dense = [1.0 + i for i in range(args.models)]
        sparse = [1.0, 2.0] + [0.0] * (args.models - 2)
        rows = []

        def to_disk(method, weights, out):
            return lambda: run_merge(MergeConfiguration.model_validate(config(method, paths, weights)), str(root / out), options=OPTIONS)

        base = median_seconds(to_disk("linear", dense, "a"), args.repeats)
        ours = median_seconds(to_disk("recycle_linear", dense, "b"), args.repeats)
        rows.append(("run_merge to disk, all weights > 0", "linear", base, ours))

        sparse_yaml = root / "sparse.yml"
        sparse_yaml.write_text(yaml.safe_dump(config("recycle_linear", paths, sparse)))
        base = median_seconds(to_disk("linear", sparse, "c"), args.repeats)
        ours = median_seconds(lambda: merge_yaml(sparse_yaml, root / "d", OPTIONS), args.repeats)
        rows.append((f"to disk, {args.models - 2} of {args.models} weights = 0", "linear via run_merge", base, ours))

        states = {str(p): load_file(str(p / "model.safetensors")) for p in paths}
        weights = dict(zip(states, dense))
        base = median_seconds(lambda: merge_state_dicts(states, "linear", parameters={"weight": weights}), args.repeats)
        ours = median_seconds(lambda: merge_state_dicts(states, "recycle_linear", parameters={"weight": weights}), args.repeats)
        rows.append(("merge_state_dicts in memory", "linear", base, ours))

    print(f"| case | baseline | baseline s | recycle_linear s | ratio (ours / baseline) |")
    print("| --- | --- | --- | --- | --- |")
    for case, baseline, base, ours in rows:
        print(f"| {case} | {baseline} | {base:.3f} | {ours:.3f} | {ours / base:.2f} |")


if __name__ == "__main__":
    main()
