"""What the architecture check adds to resolving a pool: a model skeleton on the meta device and the
renaming of every tensor with transformers' loading rules (architecture.tensor_map).

    .venv/bin/python bench/pool_check.py [--pool DIR] [--repeats 5]

Two measures:
  - the pool check of a real pool folder (default: a demo pool built here with --size small),
    with the architecture check and without it (the header comparison alone, as before), in one run;
  - the skeleton and the renaming alone for 7B-class configs (Llama-2-7B, Qwen2-7B, Pythia-6.9B
    shapes), which no test pool reaches: the check's cost does not grow with the weights' bytes.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def timed(function, repeats: int) -> float:
    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        values.append(time.perf_counter() - started)
    return statistics.median(values)


def seven_b_configs():
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    return {
        "Llama-2-7B": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                  vocab_size=32000, architectures=["LlamaForCausalLM"]),
        "Qwen2-7B": Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, vocab_size=152064, architectures=["Qwen2ForCausalLM"]),
        "Pythia-6.9B": GPTNeoXConfig(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                                     num_attention_heads=32, vocab_size=50432, architectures=["GPTNeoXForCausalLM"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, help="a demo pool folder (with recipe.yaml); default: build a small one")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_recycle import pool as pool_module
    from mergekit_recycle.architecture import tensor_map
    from mergekit_recycle.demo_pool import build_pool
    from mergekit_recycle.recipe import load_recipe

    folder = args.pool
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "pool"
        build_pool(folder, seed=0, size="small")
    recipe_path = folder / "recipe.yaml"
    recipe = load_recipe(recipe_path)
    checkpoints = [pool_module.resolve_local(entry, f"pool[{i}]", recipe_path) for i, entry in enumerate(recipe.pool)]
    checkpoints = [c for group in checkpoints for c in group]

    def headers_only():  # the comparison as it was before the architecture check: headers, names, shapes
        layouts = [pool_module._read_layout(c, recipe_path) for c in checkpoints]
        assert all(layout.shapes.keys() == layouts[0].shapes.keys() for layout in layouts)

    def with_architecture_check():
        pool_module.check_compatible(checkpoints, recipe_path)

    headers_only(), with_architecture_check()  # warm the imports and the file cache
    before, now = timed(headers_only, args.repeats), timed(with_architecture_check, args.repeats)
    print(f"pool {folder} ({len(checkpoints)} checkpoints), median of {args.repeats}\n")
    print("| pool check | median s | ratio |\n|---|---:|---:|")
    print(f"| headers only (before) | {before:.3f} | 1.00 |")
    print(f"| with the architecture check (now) | {now:.3f} | {now / before:.2f} |")

    print("\n| 7B-class config | parameters | skeleton on meta, s | renaming, s |\n|---|---:|---:|---:|")
    for name, config in seven_b_configs().items():
        def skeleton(config=config):
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)

        model = skeleton()
        names = list(model.state_dict())
        parameters = sum(p.numel() for p in model.parameters())
        build = timed(skeleton, args.repeats)
        rename = timed(lambda: tensor_map(model, names), args.repeats)
        print(f"| {name} | {parameters / 1e9:.2f} B | {build:.3f} | {rename:.3f} |")


if __name__ == "__main__":
    main()
