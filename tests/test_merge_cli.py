"""`mergekit-recycle merge`: any mergekit YAML, mergekit's options, one-line errors."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import lines, run_cli
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file

import mergekit_recycle  # noqa: F401 - registers recycle_linear


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


def test_same_output_as_run_merge(pool, tmp_path):
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
    result = run_cli("merge", str(path), str(tmp_path / "ours"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

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
    result = run_cli("merge", str(write_config(tmp_path / "m.yml", config)), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
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
    result = run_cli("merge", str(path), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    message = lines(result.stderr)
    assert len(message) == 1, result.stderr
    assert message[0].startswith(f"{path}: {location}: ")
    for word in words:
        assert word in message[0]
    assert not (tmp_path / "out").exists()


def test_weight_error_found_while_merging_is_one_line(pool, tmp_path):
    # A gradient only turns negative in later layers: the kernel finds it, naming model and tensor.
    config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-b": [1.0, -1.0]})
    result = run_cli("merge", str(write_config(tmp_path / "g.yml", config)), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2
    message = [line for line in lines(result.stderr) if line.startswith("recycle_linear:")]
    assert len(message) == 1 and "Traceback" not in result.stderr
    assert "ckpt-b" in message[0] and "while merging model.layers.1." in message[0]


def test_debug_variable_shows_the_traceback(pool, tmp_path):
    path = write_config(tmp_path / "bad.yml", recycle_config(pool, {"ckpt-a": 0.0, "ckpt-b": 0.0}))
    result = run_cli("merge", str(path), str(tmp_path / "out"), env={"MERGEKIT_RECYCLE_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "MergeConfigError" in result.stderr


def test_missing_config_file(tmp_path):
    result = run_cli("merge", str(tmp_path / "nope.yml"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert lines(result.stderr) == [f"{tmp_path / 'nope.yml'}: merge configuration file not found"]


def test_unusual_model_paths_and_lookalike_strings_are_left_alone(pool, tmp_path):
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
    result = run_cli("merge", str(path), str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
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
def test_more_bad_merge_configs(pool, tmp_path, change, location, words):
    config = recycle_config(pool, {"ckpt-a": 1.0, "ckpt-b": 1.0})
    change(config, pool)
    path = write_config(tmp_path / "bad.yml", config)
    result = run_cli("merge", str(path), str(tmp_path / "out"), "--quiet", cwd=pool["root"].parent)
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert lines(result.stderr)[0].startswith(f"{path}: {location}: ")
    assert all(word in result.stderr for word in words)
