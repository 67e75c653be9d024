"""Damaged, inconsistent and non-finite checkpoints: one line naming the checkpoint (and the file, field or
tensor), exit 2, before anything is evaluated; a merge that overflows is a failed candidate, not a score."""

import json
from pathlib import Path
from typing import Dict

import pytest
import yaml
from conftest import invoke, lines
from safetensors.torch import load_file, save_file

from mergekit_recycle.errors import NonFiniteMergeError
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe
from mergekit_recycle.resident_merge import ResidentMerger, load_resident_model

TENSOR = "model.layers.1.mlp.up_proj.weight"


def write_recipe(paths: Dict[str, Path], **changes) -> Path:
    """Three of the fixture's checkpoints, one task, two proposals: a run of a few seconds."""
    data = {"name": "damaged", "pool": [{"path": name} for name in ("ckpt-a", "ckpt-b", "ckpt-c")],
            "tasks": [{"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test", "metric": "acc"}],
            "task_paths": ["tasks/"], "search": {"budget": 2, "seed": 0}, "selection": {"holdback": 0},
            "merge": {"dtype": "float32", "device": "cpu"}} | changes
    path = paths["root"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def optimize(recipe: Path, *flags: str, env: Dict[str, str] = None):
    return invoke("optimize", str(recipe), "--quiet", *flags, env=env)


def refusal(result, recipe: Path, location: str, checkpoint: Path) -> str:
    """The one line of a refused command, checked to name the recipe, the field and the checkpoint."""
    assert result.exit_code == 2, result.output
    assert len(lines(result.stderr)) == 1, result.stderr
    line = lines(result.stderr)[0]
    assert line.startswith(f"{recipe}: {location}: checkpoint {checkpoint}: "), line
    return line


def journal(recipe: Path) -> bytes:
    return (recipe.parent / "runs" / "damaged" / "journal.jsonl").read_bytes()


def test_damaged_safetensors_are_named_by_validate_and_optimize_and_nothing_journaled_is_lost(pool):
    recipe = write_recipe(pool)
    assert optimize(recipe).exit_code == 0
    before = journal(recipe)
    weights = pool["ckpt-b"] / "model.safetensors"
    healthy = weights.read_bytes()
    damages = {"truncated": healthy[: len(healthy) // 2], "garbage header": b"\xff" * 16 + healthy[16:],
               "trailing bytes": healthy + b"junk", "zero bytes": b""}
    for damage, content in damages.items():
        weights.write_bytes(content)
        for result in (invoke("validate", str(recipe), "--no-check-tasks"), optimize(recipe)):
            line = refusal(result, recipe, "pool[1]", pool["ckpt-b"])
            assert "cannot read model.safetensors (SafetensorError: " in line and "damaged or incomplete" in line, damage
        assert journal(recipe) == before, damage  # refused before any evaluation: the run is as it was


@pytest.mark.parametrize("config, expected", [
    ([1, 2], "config.json holds a JSON list where transformers expects an object of settings"),
    ({"architectures": 5, "model_type": "llama"}, 'config.json field "architectures" is 5; expected a list of model '
                                                  'class names'),
    ("{not json", "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
])
def test_a_bad_config_json_names_the_file_and_the_field(pool, config, expected):
    (pool["ckpt-b"] / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    recipe = write_recipe(pool)
    line = refusal(invoke("validate", str(recipe), "--no-check-tasks"), recipe, "pool[1]", pool["ckpt-b"])
    assert expected in line and "copy in the config.json saved with these weights" in line


def test_a_config_json_that_does_not_fit_its_tensors_is_refused_when_the_pool_is_read(pool):
    config = json.loads((pool["ckpt-a"] / "config.json").read_text())
    (pool["ckpt-a"] / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 6}))
    recipe = write_recipe(pool)
    for result in (invoke("validate", str(recipe), "--no-check-tasks"), optimize(recipe)):
        line = refusal(result, recipe, "pool[0]", pool["ckpt-a"])
        assert "has shape [44, 32] but the model its config.json describes has [50, 32]" in line
        assert "model.embed_tokens.weight" in line or "lm_head.weight" in line
    assert not (recipe.parent / "runs").exists()


def test_the_checkpoint_at_fault_is_named_not_a_healthy_one(pool):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=44, n_positions=64,
                      architectures=["GPT2LMHeadModel"])
    # A GPT-2 config.json over pool[0]'s Llama weights: against its own weights, pool[0] is at fault even when
    # only two checkpoints disagree.
    (pool["ckpt-a"] / "config.json").write_text(gpt2.to_json_string())
    recipe = write_recipe(pool, pool=[{"path": "ckpt-a"}, {"path": "ckpt-b"}])
    line = refusal(optimize(recipe), recipe, "pool[0]", pool["ckpt-a"])
    assert "the GPT2LMHeadModel model has parameters no checkpoint tensor writes" in line and "pool[1]" not in line
    # A whole GPT-2 checkpoint on pool[0], among Llama ones: the odd one out is named.
    GPT2LMHeadModel(gpt2).save_pretrained(pool["ckpt-a"])
    recipe = write_recipe(pool)
    for result in (invoke("validate", str(recipe), "--no-check-tasks"), optimize(recipe)):
        line = refusal(result, recipe, "pool[0]", pool["ckpt-a"])
        assert "architecture GPT2LMHeadModel (pool[1], ckpt-b, has LlamaForCausalLM)" in line


def poison(checkpoint: Path, value: float) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    tensors[TENSOR][3, 5] = value
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value, found", [(float("nan"), "1 NaN value"), (float("inf"), "1 inf value")])
def test_a_non_finite_checkpoint_is_refused_before_the_first_evaluation(pool, value, found):
    poison(pool["ckpt-c"], value)
    recipe = write_recipe(pool)
    line = refusal(optimize(recipe), recipe, "pool[2]", pool["ckpt-c"])
    assert f"tensor {TENSOR} holds {found};" in line
    assert not (recipe.parent / "runs" / "damaged" / "journal.jsonl").exists()


def test_a_streamed_non_finite_checkpoint_stops_the_run_at_its_first_read_keeping_the_journal(pool):
    poison(pool["ckpt-b"], float("nan"))
    recipe = write_recipe(pool)
    # A pool memory of 1 byte streams every tensor from disk: ckpt-b is first read by its baseline,
    # after ckpt-a's was journaled.
    line = refusal(optimize(recipe, env={"MERGEKIT_RECYCLE_POOL_MEMORY": "1"}), recipe, "pool[1]", pool["ckpt-b"])
    assert f"tensor {TENSOR} holds 1 NaN value;" in line
    records = [json.loads(text) for text in journal(recipe).decode().splitlines()]
    scored = [r for r in records if r["type"] == "evaluation"]
    assert [(r["name"], r["status"]) for r in scored] == [("ckpt-a", "ok")]


def test_a_merge_that_overflows_is_a_failed_candidate_not_a_score(pool):
    huge = 3e38  # finite in float32; twice it is not
    poison(pool["ckpt-a"], huge)
    poison(pool["anchor"], 0.0)
    recipe = write_recipe(pool, base={"path": "anchor"}, search={"budget": 2, "seed": 0, "scale": 2.0})
    loaded = resolve_pool(load_recipe(recipe), recipe)
    model, _ = load_resident_model(loaded, "float32", "cpu")
    merger = ResidentMerger(loaded, model, "float32")  # every checkpoint is finite: accepted
    merger.merge(Merge(weights={"ckpt-a": 1.0, "ckpt-b": 1.0}, scale=1.0))
    with pytest.raises(NonFiniteMergeError) as caught:
        merger.merge(Merge(weights={"ckpt-a": 1.0}, scale=2.0))  # 2 × 3e38 overflows float32
    assert caught.value.tensor == TENSOR and "narrow search.scale" in str(caught.value)
    # Through the search: journaled as failed, with the reason, never as a score.
    result = optimize(recipe)
    records = [json.loads(text) for text in journal(recipe).decode().splitlines()]
    failed = [r for r in records if r["type"] == "evaluation" and r["status"] == "failed"]
    assert result.exit_code == 0, result.output  # the baselines (scale 1) were scored; the search went on
    assert [r["name"] for r in failed] == ["proposal 000000", "proposal 000001"]  # scale 2: both overflow
    assert all(r["error"].startswith(f"NonFiniteMergeError: the merged tensor {TENSOR} holds NaN or inf")
               and r["objective"] is None for r in failed)
