"""The architecture matrix: every architecture in architecture.SUPPORTED, as tiny random checkpoints.

For each: the resident merge of a 3-checkpoint proposal equals `mergekit-recycle merge` of its YAML
loaded by AutoModelForCausalLM, its scores equal lm-eval's HFLM on that folder, and `optimize` runs
to a merged model. The checkpoints are built once per architecture and shared by its tests.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from mergekit_recycle import demo_pool
from mergekit_recycle.architecture import SUPPORTED
from mergekit_recycle.demo_pool.model import tiny_causal_lm
from mergekit_recycle.evaluate import Scorer
from mergekit_recycle.mergekit_yaml import write_merge_config
from mergekit_recycle.optimize import RunOptions, optimize
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe
from mergekit_recycle.resident_merge import ResidentMerger, load_resident_model

NAMES = ["ckpt-0", "ckpt-1", "ckpt-2"]
WEIGHTS = {"ckpt-0": 0.5, "ckpt-1": 0.3, "ckpt-2": 0.2}
SEARCH_TASKS = ["toy_add_dev", "toy_sort_dev", "toy_shift_dev"]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("matrix-tasks") / "tasks"
    demo_pool.write_tasks(directory, demo_pool.evaluation_examples(seed=0, dev_size=12, test_size=12))
    return directory


_POOLS = {}


def matrix_pool(architecture: str, tasks_dir: Path, root: Path) -> Path:
    """Three tiny random checkpoints of `architecture` and a recipe over them, built once per module."""
    if architecture in _POOLS:
        return _POOLS[architecture]
    folder = root / architecture
    tokenizer = demo_pool.char_tokenizer()
    for seed, name in enumerate(NAMES):
        demo_pool.save_checkpoint(tiny_causal_lm(tokenizer, seed, SUPPORTED[architecture].model_type), tokenizer,
                                  folder / name)
    lines = [f"name: matrix-{architecture}", "pool:"] + [f"  - path: {name}" for name in NAMES] + ["tasks:"]
    for skill, search, holdout in demo_pool.skill_tasks():
        lines += [f"  - {{name: {skill}, search: {search}, holdout: {holdout}, metric: acc}}"]
    lines += [f"task_paths: [{tasks_dir}]", "search: {budget: 4, population: 4, seed: 0}",
              "selection: {holdback: 0.5, finalists: 2}", "merge: {dtype: float32, device: cpu}"]
    (folder / "recipe.yaml").write_text("\n".join(lines) + "\n")
    _POOLS[architecture] = folder
    return folder


@pytest.fixture(scope="module")
def matrix_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def hflm_scores(pretrained, tokenizer, tasks_dir: Path, samples=None):
    """lm-eval's own evaluate with HFLM: what the resident scores must agree with."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(SEARCH_TASKS, TaskManager(include_path=str(tasks_dir), include_defaults=False))
    lm = HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=16, device="cpu", dtype="float32")
    results = lm_eval.evaluator.evaluate(lm, tasks, samples=samples, bootstrap_iters=0, verbosity="ERROR")
    return {task: results["results"][task]["acc,none"] for task in SEARCH_TASKS}


def assert_resident_equals_mergekit(recipe_path: Path, tmp_path: Path, weights=WEIGHTS):
    """The resident merge of `weights` equals mergekit's merge of its YAML, loaded by AutoModelForCausalLM;
    return the resident model and the merged folder."""
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from mergekit_recycle.merge import merge_yaml

    recipe = load_recipe(recipe_path)
    pool = resolve_pool(recipe, recipe_path)
    model, tokenizer = load_resident_model(pool, "float32", "cpu")
    ResidentMerger(pool, model, "float32").merge(Merge(weights=weights))
    config = write_merge_config(tmp_path / "proposal.yaml", Merge(weights=weights), pool, "float32", "a proposal")
    merge_yaml(config, tmp_path / "merged", MergeOptions(copy_tokenizer=True, quiet=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == type(model).__name__
    ours, theirs = model.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6), name
    return model, tokenizer, tmp_path / "merged"


@pytest.mark.parametrize("architecture", list(SUPPORTED))
def test_resident_merge_and_scores_equal_mergekit_and_lm_eval(architecture, tasks_dir, matrix_root, tmp_path):
    from transformers import AutoTokenizer

    folder = matrix_pool(architecture, tasks_dir, matrix_root)
    model, tokenizer, merged = assert_resident_equals_mergekit(folder / "recipe.yaml", tmp_path)
    assert type(model).__name__ == architecture
    # Tied embeddings stay tied, and were merged once.
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    scorer = Scorer(model, tokenizer, SEARCH_TASKS, [tasks_dir], seed=0)
    resident = {task: metrics["acc"] for task, metrics in scorer.score().items()}
    assert resident == hflm_scores(str(merged), AutoTokenizer.from_pretrained(merged), tasks_dir)


@pytest.mark.parametrize("architecture", list(SUPPORTED))
def test_optimize_runs_to_a_merged_model(architecture, tasks_dir, matrix_root, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = matrix_pool(architecture, tasks_dir, matrix_root)
    recipe_path = folder / "recipe.yaml"
    run_dir = tmp_path / "run"
    report = optimize(load_recipe(recipe_path), recipe_path, RunOptions(run_dir=run_dir, budget=4, seed=0, device="cpu"))
    assert report["finished"] and report["evaluations"] == 4
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert type(merged).__name__ == architecture
    assert (run_dir / "merged" / "mergekit_config.yml").read_text() == (run_dir / "winner.yaml").read_text()


def copy_pool(folder: Path, tmp_path: Path, change=None) -> Path:
    """A private copy of a matrix pool; change(name, tensors) -> tensors rewrites each checkpoint's weights."""
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    for name in NAMES if change else ():
        weights = copy / name / "model.safetensors"
        save_file(change(name, load_file(weights)), weights, metadata={"format": "pt"})
    return copy


def test_pythia_files_with_buffers_pool_with_files_transformers_5_saved(tasks_dir, matrix_root, tmp_path):
    """Pythia's files keep the attention masks and rotary frequencies that transformers 5 recomputes and no
    longer saves: such files pool with new ones, the buffers are left out, and the merges still agree."""
    folder = matrix_pool("GPTNeoXForCausalLM", tasks_dir, matrix_root)

    def with_buffers(name, tensors):
        if name != "ckpt-1":
            return tensors
        for layer in range(2):
            prefix = f"gpt_neox.layers.{layer}.attention."
            tensors[prefix + "bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
            tensors[prefix + "masked_bias"] = torch.tensor(-1e9)
            tensors[prefix + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 2, 2).float() / 2))
        return tensors

    copy = copy_pool(folder, tmp_path, with_buffers)
    assert "gpt_neox.layers.0.attention.bias" in load_file(copy / "ckpt-1" / "model.safetensors")
    pool = resolve_pool(load_recipe(copy / "recipe.yaml"), copy / "recipe.yaml")
    assert "gpt_neox.layers.0.attention.bias" not in pool.layout.shapes
    assert pool.layout.targets["embed_out.weight"] == "lm_head.weight"
    model, _, merged = assert_resident_equals_mergekit(copy / "recipe.yaml", tmp_path)
    assert "gpt_neox.layers.0.attention.bias" not in load_file(merged / "model.safetensors")


def test_a_parameter_no_tensor_writes_is_refused_before_anything_is_evaluated(tasks_dir, matrix_root, tmp_path):
    folder = matrix_pool("LlamaForCausalLM", tasks_dir, matrix_root)
    copy = copy_pool(folder, tmp_path, lambda name, tensors: {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    result = run_cli("optimize", str(copy / "recipe.yaml"), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pool[0]" in result.stderr and "the LlamaForCausalLM model has parameters no checkpoint tensor writes: " \
        "lm_head.weight" in result.stderr
    assert not (tmp_path / "run" / "journal.jsonl").exists()


@pytest.fixture(scope="module")
def falcon_pool(tasks_dir, tmp_path_factory) -> Path:
    """Two tiny Falcon-7B-style checkpoints: transformers 5 builds them, mergekit 0.1.5's definition (Falcon-40B's
    layer norms) cannot merge them. Not in the tested matrix."""
    folder = tmp_path_factory.mktemp("falcon")
    tokenizer = demo_pool.char_tokenizer()
    for seed, name in enumerate(NAMES[:2]):
        demo_pool.save_checkpoint(tiny_causal_lm(tokenizer, seed, "falcon"), tokenizer, folder / name)
    recipe = (matrix_pool("LlamaForCausalLM", tasks_dir, folder / "unused").joinpath("recipe.yaml").read_text()
              .replace("  - path: ckpt-2\n", "").replace("budget: 4, population: 4", "budget: 2, population: 2"))
    (folder / "recipe.yaml").write_text(recipe)
    return folder


def test_an_untested_architecture_is_refused_with_one_line_by_validate_and_optimize(falcon_pool, tmp_path):
    from mergekit_recycle.errors import PoolError

    result = run_cli("validate", str(falcon_pool / "recipe.yaml"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    with pytest.raises(PoolError) as refused:  # what optimize prints, through the same one-line handler
        optimize(load_recipe(falcon_pool / "recipe.yaml"), falcon_pool / "recipe.yaml",
                 RunOptions(run_dir=tmp_path / "run", budget=2, seed=0, device="cpu"))
    for message in (result.stderr, str(refused.value)):
        assert "pool[0]" in message and "architecture FalconForCausalLM is not one mergekit-recycle has tested" \
            in message and "merge.allow_untested_architecture: true" in message
    assert not (tmp_path / "run").exists()


def test_a_final_merge_that_fails_is_reported_as_a_failure_and_a_rerun_tries_again(falcon_pool, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((falcon_pool / "recipe.yaml").read_text().replace("device: cpu}", "device: cpu, "
                      "allow_untested_architecture: true}").replace("path: ckpt", f"path: {falcon_pool}/ckpt"))
    run_dir = tmp_path / "run"
    validated = run_cli("validate", str(recipe), "--no-check-tasks")
    assert validated.returncode == 0 and "FalconForCausalLM (pool[0], pool[1]): NOT tested" in validated.stdout
    from mergekit_recycle.errors import FinalMergeError

    for attempt in (1, 2):  # the command, then the same run again from Python: it merges again, and fails again
        if attempt == 1:
            result = run_cli("optimize", str(recipe), "--run-dir", str(run_dir), "--quiet")
            assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            message = result.stderr
        else:
            with pytest.raises(FinalMergeError) as failed:
                optimize(load_recipe(recipe), recipe, RunOptions(run_dir=run_dir, budget=2, seed=0, device="cpu"))
            message = str(failed.value)
            assert failed.value.architecture == "FalconForCausalLM" and "ln_attn" in failed.value.tensor
        assert "merging the winner into merged/ failed for FalconForCausalLM" in message
        assert "Tensor transformer.h.0.ln_attn" in message and "unexpected" not in message
        report = json.loads((run_dir / "report.json").read_text())
        assert report["finished"] is False and "ln_attn" in report["merge_error"] and report["evaluations"] == 2
        assert "Merging the winner into merged/ failed" in (run_dir / "report.md").read_text()
        assert not (run_dir / "merged.partial").exists() and not (run_dir / "merged").exists()
        failures = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()
                    if '"merge_failed"' in line]
        assert len(failures) == attempt and failures[-1]["architecture"] == "FalconForCausalLM"


def test_gpt2_files_saved_without_the_transformer_prefix_merge_where_transformers_loads_them(tasks_dir, matrix_root,
                                                                                             tmp_path):
    """openai-community/gpt2's files name tensors without `transformer.` and keep the attention-mask buffers."""
    folder = matrix_pool("GPT2LMHeadModel", tasks_dir, matrix_root)

    def old_layout(name, tensors):
        old = {key.removeprefix("transformer."): value for key, value in tensors.items()}
        for layer in range(2):
            old[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)
        return old

    copy = copy_pool(folder, tmp_path, old_layout)
    pool = resolve_pool(load_recipe(copy / "recipe.yaml"), copy / "recipe.yaml")
    assert pool.layout.targets["h.0.attn.c_attn.weight"] == "transformer.h.0.attn.c_attn.weight"
    assert "h.0.attn.bias" in pool.layout.left_out
    assert_resident_equals_mergekit(copy / "recipe.yaml", tmp_path)


def test_a_mixture_of_experts_is_refused_naming_the_parameters_nothing_writes(tasks_dir, tmp_path):
    """transformers 5 fuses Mixtral's experts as it loads them; a tensor-by-tensor merge cannot, so even an
    allowed untested architecture is refused before anything is evaluated, rather than half merged."""
    from mergekit_recycle.errors import PoolError

    tokenizer = demo_pool.char_tokenizer()
    for seed, name in enumerate(NAMES[:2]):
        demo_pool.save_checkpoint(tiny_causal_lm(tokenizer, seed, "mixtral"), tokenizer, tmp_path / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: moe\npool: [{{path: {NAMES[0]}}}, {{path: {NAMES[1]}}}]\n"
                      "tasks: [{name: add, search: toy_add_dev, holdout: toy_add_test, metric: acc}]\n"
                      f"task_paths: [{tasks_dir}]\nmerge: {{allow_untested_architecture: true}}\n")
    with pytest.raises(PoolError) as refused:
        resolve_pool(load_recipe(recipe), recipe)
    message = str(refused.value)
    assert "pool[0]" in message and "the MixtralForCausalLM model has parameters no checkpoint tensor writes: " \
        "model.layers.0.mlp.experts.gate_up_proj" in message and "transformers converts" in message
    assert "\n" not in message


def test_the_readme_lists_the_tested_matrix_and_its_corrections():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Architectures\n")[1].split("\n### ")[0]
    rows = re.findall(r"^\| `(\w+)` \|[^|]+\|([^|]*)\|$", section, re.M)
    assert [name for name, _ in rows] == list(SUPPORTED)
    assert [name for name, correction in rows if correction.strip()] == [
        name for name, architecture in SUPPORTED.items() if architecture.correction]
