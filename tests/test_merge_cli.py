"""`mergekit-recycle merge`: any mergekit YAML, mergekit's options, one-line errors."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke, lines, run_cli
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from mergekit_recycle.merge import merge_yaml
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.recipe import load_recipe
from mergekit_recycle.resident_merge import load_resident_model


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def recycle_config(pool, weights, **extra) -> dict:
    return {
        "merge_method": "recycle_linear",
        "models": [{"model": str(pool[name]), "parameters": {"weight": w}} for name, w in weights.items()],
        "dtype": "float32",
        **extra,
    }


def all_tensors(directory: Path) -> dict:
    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(str(shard)))
    return found


def test_same_output_as_run_merge(pool, tmp_path, monkeypatch):
    # Relative model paths, as users write them, resolved against the working directory.
    config = {
        "merge_method": "recycle_linear",
        "base_model": "pool/anchor",
        "models": [
            {"model": "pool/ckpt-a", "parameters": {"weight": 0.7}},
            {"model": "pool/ckpt-b", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"scale": 1.25},
        "dtype": "float32",
    }
    path = write_config(tmp_path / "merge.yml", config)
    monkeypatch.chdir(tmp_path)
    result = invoke("merge", str(path), str(tmp_path / "ours"), "--quiet")
    assert result.exit_code == 0, result.output

    absolute = yaml.safe_load(path.read_text())
    absolute["base_model"] = str(pool["anchor"])
    for entry in absolute["models"]:
        entry["model"] = str(tmp_path / entry["model"])
    run_merge(MergeConfiguration.model_validate(absolute), str(tmp_path / "theirs"), options=MergeOptions(quiet=True))

    ours, theirs = all_tensors(tmp_path / "ours"), all_tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "theirs" / "config.json").read_text()
    assert (tmp_path / "ours" / "mergekit_config.yml").read_text() == path.read_text()
    assert (tmp_path / "ours" / "tokenizer.json").is_file()


def test_takes_mergekit_yaml_options(pool, tmp_path):
    help_text = run_cli("merge", "--help").stdout
    for option in ("--cuda", "--lazy-unpickle", "--out-shard-size", "--copy-tokenizer", "--allow-crimes"):
        assert option in help_text
    path = write_config(tmp_path / "merge.yml", recycle_config(pool, {"ckpt-a": 1, "ckpt-b": 1}))
    result = run_cli("merge", str(path), str(tmp_path / "out"), "--quiet", "--out-shard-size", "20K", "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_runs_other_mergekit_methods(pool, tmp_path):
    config = recycle_config(pool, {"ckpt-a": 1, "ckpt-b": 3})
    config["merge_method"] = "linear"
    result = invoke("merge", str(write_config(tmp_path / "m.yml", config)), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "weights, extra, location, words",
    [
        ({"ckpt-a": 1.0, "ckpt-b": -2.0}, {}, "models[1].parameters.weight", ["ckpt-b", "weight must be a finite number >= 0"]),
        ({"ckpt-a": 0.0, "ckpt-b": 0.0}, {}, "models", ["all weights are zero"]),
        ({"ckpt-a": 1.0, "ckpt-b": 1.0}, {"parameters": {"scale": 1.5}}, "parameters.scale", ["needs a base_model"]),
        ({"ckpt-a": 1.0, "ckpt-b": 1.0}, {"merge_method": "no_such_method"}, "merge_method", ["unknown merge method"]),
        ({"ckpt-a": 1.0, "ckpt-b": 1.0}, {"models": "not a list"}, "models", ["valid list"]),
    ],
)
def test_bad_merge_configs_fail_with_one_line(pool, tmp_path, weights, extra, location, words):
    path = write_config(tmp_path / "bad.yml", recycle_config(pool, weights, **extra))
    result = invoke("merge", str(path), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    message = lines(result.stderr)
    assert len(message) == 1, result.stderr
    assert message[0].startswith(f"{path}: {location}: ")
    for word in words:
        assert word in message[0]
    assert not (tmp_path / "out").exists()


def test_weight_error_found_while_merging_is_one_line(pool, tmp_path):
    # A gradient only turns negative in later layers: the kernel finds it, naming model and tensor.
    config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-b": [1.0, -1.0]})
    result = invoke("merge", str(write_config(tmp_path / "g.yml", config)), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    message = [line for line in lines(result.stderr) if line.startswith("recycle_linear:")]
    assert len(message) == 1 and "Traceback" not in result.stderr
    assert "ckpt-b" in message[0] and "while merging model.layers.1." in message[0]


def test_debug_variable_shows_the_traceback(pool, tmp_path):
    path = write_config(tmp_path / "bad.yml", recycle_config(pool, {"ckpt-a": 0.0, "ckpt-b": 0.0}))
    result = run_cli("merge", str(path), str(tmp_path / "out"), env={"MERGEKIT_RECYCLE_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "MergeConfigError" in result.stderr


def test_missing_config_file(tmp_path):
    result = invoke("merge", str(tmp_path / "nope.yml"), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"{tmp_path / 'nope.yml'}: merge configuration file not found"]


def test_unusual_model_paths_and_lookalike_strings_are_left_alone(pool, tmp_path, monkeypatch):
    """A path with a space merges; a filter or tokenizer keyword that names a folder stays a keyword."""
    spaced = tmp_path / "with space"
    spaced.mkdir()
    for name in ("ckpt-a", "ckpt-b"):
        (spaced / name).symlink_to(pool[name])
    (tmp_path / "mlp").mkdir()  # a folder named like the filter below
    (tmp_path / "base").mkdir()  # and one named like the tokenizer keyword
    config = {
        "merge_method": "recycle_linear",
        "models": [
            {"model": str(spaced / "ckpt-a"), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}},
            {"model": str(spaced / "ckpt-b"), "parameters": {"weight": 1.0}},
        ],
        "tokenizer_source": "base",
        "base_model": str(spaced / "ckpt-b"),
        "dtype": "float32",
    }
    path = write_config(tmp_path / "m.yml", config)
    monkeypatch.chdir(tmp_path)
    result = invoke("merge", str(path), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    merged, b = all_tensors(tmp_path / "out"), all_tensors(pool["ckpt-b"])
    a = all_tensors(pool["ckpt-a"])
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[mlp], b[mlp])  # the filter gave ckpt-a weight 0 there
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[attention], (a[attention] + b[attention]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "change, location, words",
    [
        (lambda c, p: c["models"][1].update(model="./pool/ckpt-zzz"), "models[1].model", ["no such model directory"]),
        (lambda c, p: c.update(parameters={"scael": 2}), "parameters.scael", ["takes no parameter 'scael'"]),
        (lambda c, p: c["models"][0]["parameters"].update(scale=2), "models[0].parameters.scale", ["takes no parameter 'scale'"]),
        (lambda c, p: c["models"][0].update(parameters={}), "models[0].parameters.weight", ["no weight given"]),
    ],
)
def test_more_bad_merge_configs(pool, tmp_path, monkeypatch, change, location, words):
    config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-b": 1.0})
    change(config, pool)
    path = write_config(tmp_path / "bad.yml", config)
    monkeypatch.chdir(pool["root"].parent)
    result = invoke("merge", str(path), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert lines(result.stderr)[0].startswith(f"{path}: {location}: ")
    assert all(word in result.stderr for word in words)


def test_values_that_are_not_numbers_and_paths_that_are_not_files_are_one_line(pool, tmp_path):
    """A recipe refuses a quoted weight; so does merge, naming the field (pydantic's error was exit 1)."""
    folder = tmp_path / "a-folder.yml"
    folder.mkdir()
    cases = [
        (lambda c: c["models"][0]["parameters"].update(weight="abc"), "models[0].parameters.weight", "'abc' is not a number"),
        (lambda c: c["models"][0]["parameters"].update(weight="0.5"), "models[0].parameters.weight", "'0.5' is not a number"),
        (lambda c: c["models"][1]["parameters"].update(weight=True), "models[1].parameters.weight", "True is not a number"),
        (lambda c: c["models"][1]["parameters"].update(weight=[1.0, "x" * 5000]), "models[1].parameters.weight[1]",
         "characters) is not a number"),
        (lambda c: c.update(parameters={"scale": "2"}, base_model=str(pool["anchor"])), "parameters.scale", "is not a number"),
        # Another method's parameters are mergekit's to check; its failure is still one line.
        (lambda c: (c.update(merge_method="linear"), c["models"][0]["parameters"].update(weight="abc")), "parameters",
         "merge parameter 'weight' has a value linear cannot use"),
    ]
    for number, (change, location, words) in enumerate(cases):
        config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-b": 1.0})
        change(config)
        path = write_config(tmp_path / f"bad-{number}.yml", config)
        result = invoke("merge", str(path), str(tmp_path / "out"), "--quiet")
        assert result.exit_code == 2, (number, result.output)
        message = lines(result.stderr)
        assert len(message) == 1 and len(message[0]) < 400, result.stderr
        assert message[0].startswith(f"{path}: {location}: ") and words in message[0], message[0]
        assert "write a number" in message[0] or number == 5
        assert not (tmp_path / "out" / "model.safetensors").exists()
    too_long = tmp_path / ("x" * 300 + ".yml")
    for path, words in [(folder, "a folder, not a file"), (tmp_path / "missing.yml", "merge configuration file not found"),
                        (too_long, "File name too long")]:
        result = invoke("merge", str(path), str(tmp_path / "out"))
        assert result.exit_code == 2 and len(lines(result.stderr)) == 1, result.output  # not click's usage text
        assert words in result.stderr and len(result.stderr) < 500, result.stderr
        assert result.stderr.startswith(f"{path}: " if path != too_long else str(tmp_path)), result.stderr


def test_tokenizer_donor_is_chosen_by_rule_and_the_card_is_titled_by_name(pool, tmp_path):
    """mergekit picks the donor as list(set(models))[0], which follows PYTHONHASHSEED; merge takes the
    first model in order that has a tokenizer, whatever its weight (the search's rule), and refuses in
    one line when none has one."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pool["ckpt-a"] / name).unlink()
    for name in ("ckpt-c", "ckpt-b", "anchor"):
        settings = pool[name] / "tokenizer_config.json"
        settings.write_text(settings.read_text().replace("{", f'{{"donor": "{name}", ', 1))
    config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-c": 1.0, "ckpt-b": 1.0}, base_model=str(pool["anchor"]))
    path = write_config(tmp_path / "merge.yml", config)
    merge_yaml(path, tmp_path / "merged.partial", MergeOptions(quiet=True), name="toy-recycle")
    assert '"donor": "ckpt-c"' in (tmp_path / "merged.partial" / "tokenizer_config.json").read_text()
    assert (tmp_path / "merged.partial" / "tokenizer.json").is_file()
    card = (tmp_path / "merged.partial" / "README.md").read_text()
    assert "# toy-recycle" in card and "merged.partial" not in card

    config["merge_method"] = "task_arithmetic"  # mergekit's order for other methods: base_model first
    merge_yaml(write_config(tmp_path / "linear.yml", config), tmp_path / "linear", MergeOptions(quiet=True))
    assert '"donor": "anchor"' in (tmp_path / "linear" / "tokenizer_config.json").read_text()

    # A baseline: the only weighted model has no tokenizer; the donor is still chosen among all the models,
    # zero weights included, as the search chose the tokenizer it scored with.
    baseline = write_config(tmp_path / "baseline.yml", recycle_config(pool, {"ckpt-c": 0, "ckpt-a": 1.0}))
    merge_yaml(baseline, tmp_path / "baseline", MergeOptions(quiet=True))
    assert '"donor": "ckpt-c"' in (tmp_path / "baseline" / "tokenizer_config.json").read_text()
    recipe = write_config(pool["root"] / "recipe.yaml", {
        "name": "baseline", "pool": [{"path": "ckpt-a"}, {"path": "ckpt-c"}], "task_paths": ["tasks/"],
        "tasks": [{"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test", "metric": "acc"}]})
    _, scored = load_resident_model(resolve_pool(load_recipe(recipe), recipe), "float32", "cpu")
    assert scored.init_kwargs.get("donor") == "ckpt-c"

    for name in ("ckpt-b", "ckpt-c", "anchor"):
        (pool[name] / "tokenizer.json").unlink()
    result = invoke("merge", str(path), str(tmp_path / "none"), "--quiet")
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"{path}: models: no model folder has a tokenizer (tokenizer.json, vocab.json, "
                                    "vocab.txt, *.model, *.tiktoken); add one to a model's folder, or merge with "
                                    "--no-copy-tokenizer"]
    assert not (tmp_path / "none").exists()
