"""recycle_linear against mergekit's own linear merge, a hand computation, and its error cases."""

from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import get as get_method
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.options import MergeOptions
from safetensors.torch import load_file

import mergekit_recycle  # noqa: F401 - registers recycle_linear where the installed .pth does not
from mergekit_recycle.errors import RecycleLinearError

OPTIONS = MergeOptions(quiet=True, write_model_card=False)


def tensors(directory: Path):
    return load_file(str(directory / "model.safetensors"))


def merge_with_mergekit(config: dict, out: Path) -> dict:
    run_merge(MergeConfiguration.model_validate(config), str(out), options=OPTIONS)
    return tensors(out)


def assert_close(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=atol, rtol=0), name


def test_registered_on_import():
    assert get_method("recycle_linear").spec.name == "recycle_linear"


def test_matches_mergekit_linear_through_run_merge(pool, tmp_path):
    models = [
        {"model": str(pool["ckpt-a"]), "parameters": {"weight": 0.2}},
        {"model": str(pool["ckpt-b"]), "parameters": {"weight": 1.3}},
        {"model": str(pool["ckpt-c"]), "parameters": {"weight": 0.5}},
    ]
    ours = merge_with_mergekit({"merge_method": "recycle_linear", "models": models, "dtype": "float32"}, tmp_path / "ours")
    theirs = merge_with_mergekit(
        {"merge_method": "linear", "models": models, "dtype": "float32", "parameters": {"normalize": True}},
        tmp_path / "linear",
    )
    assert_close(ours, theirs)


def test_matches_mergekit_linear_in_memory(pool):
    state = {name: tensors(pool[name]) for name in ("ckpt-a", "ckpt-b", "ckpt-c")}
    weights = {"ckpt-a": 3.0, "ckpt-b": 0.25, "ckpt-c": 1.0}
    ours = merge_state_dicts(state, "recycle_linear", parameters={"weight": weights})
    theirs = merge_state_dicts(state, "linear", parameters={"weight": weights, "normalize": True})
    assert_close(ours, theirs)


def test_anchor_and_scale_match_hand_computation(pool, tmp_path):
    weights = {"ckpt-a": 1.0, "ckpt-b": 3.0}
    scale = 1.4
    config = {
        "merge_method": "recycle_linear",
        "base_model": str(pool["anchor"]),
        "models": [{"model": str(pool[n]), "parameters": {"weight": w}} for n, w in weights.items()],
        "parameters": {"scale": scale},
        "dtype": "float32",
    }
    merged = merge_with_mergekit(config, tmp_path / "out")
    anchor = tensors(pool["anchor"])
    inputs = {n: tensors(pool[n]) for n in weights}
    total = sum(weights.values())
    for name, theta_anchor in anchor.items():
        delta = sum(w / total * (inputs[n][name].double() - theta_anchor.double()) for n, w in weights.items())
        expected = theta_anchor.double() + scale * delta
        assert torch.allclose(merged[name].double(), expected, atol=1e-6), name
    # Differs from the plain average: the scale really extrapolates.
    plain = merge_state_dicts(inputs, "recycle_linear", parameters={"weight": weights})
    assert not torch.allclose(plain["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_anchor_in_memory_with_its_own_weight():
    a, b, base = (torch.randn(5, 3, dtype=torch.float64) for _ in range(3))
    merged = merge_state_dicts(
        {"a": {"w": a}, "b": {"w": b}, "base": {"w": base}},
        "recycle_linear",
        parameters={"weight": {"a": 1.0, "b": 1.0, "base": 2.0}, "scale": 2.0},
        base="base",
    )["w"]
    # The anchor's own weight counts towards Σw; its delta is zero.
    expected = base + 2.0 * (0.25 * (a - base) + 0.25 * (b - base))
    assert merged.dtype == torch.float64
    assert torch.allclose(merged, expected, atol=1e-12)


def test_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(0)
    inputs = [torch.randn(64, 64).to(torch.bfloat16) for _ in range(6)]
    weights = [0.1, 0.2, 0.3, 0.15, 0.15, 0.1]
    merged = merge_state_dicts(
        {i: {"w": t} for i, t in enumerate(inputs)}, "recycle_linear", parameters={"weight": weights}
    )["w"]
    exact = sum(w * t.double() for w, t in zip(weights, inputs)) / sum(weights)
    naive = torch.zeros_like(inputs[0])
    for w, t in zip(weights, inputs):
        naive += w * t  # what summing in bfloat16 would give
    assert merged.dtype == torch.bfloat16
    # Only the final rounding to bfloat16 remains: half a bfloat16 ulp (2^-8 relative),
    # plus float32 rounding where the weighted terms cancel.
    assert torch.all((merged.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6)
    assert (merged.double() - exact).abs().sum() < (naive.double() - exact).abs().sum()


def test_zero_weight_model_is_never_read(pool, tmp_path):
    from conftest import invoke

    (pool["ckpt-c"] / "model.safetensors").unlink()
    config = tmp_path / "merge.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "recycle_linear",
                "models": [
                    {"model": str(pool["ckpt-a"]), "parameters": {"weight": 1.0}},
                    {"model": str(pool["ckpt-b"]), "parameters": {"weight": 2.0}},
                    {"model": str(pool["ckpt-c"]), "parameters": {"weight": 0.0}},
                ],
                "dtype": "float32",
            }
        )
    )
    result = invoke("merge", str(config), str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    expected = merge_state_dicts(
        {n: tensors(pool[n]) for n in ("ckpt-a", "ckpt-b")},
        "recycle_linear",
        parameters={"weight": {"ckpt-a": 1.0, "ckpt-b": 2.0}},
    )
    assert_close(tensors(tmp_path / "out"), expected)


@pytest.mark.parametrize(
    "weights, scale, base, expected",
    [
        ({"a": 1.0, "b": -0.5}, 1.0, None, "recycle_linear: model b: weight must be a finite number >= 0, got -0.5 (while merging w)"),
        ({"a": 0.0, "b": 0.0}, 1.0, None, "recycle_linear: all weights are zero"),
        ({"a": 1.0, "b": 1.0}, 1.5, None, "recycle_linear: scale=1.5 needs a base_model"),
        ({"a": 1.0, "b": None}, 1.0, "a", "recycle_linear: model b: no weight given"),
        ({"a": 1.0, "b": float("inf")}, 1.0, None, "recycle_linear: model b: weight must be a finite number"),
        ({"a": 1.0, "b": 1.0}, float("nan"), "a", "recycle_linear: scale must be a finite number, got nan"),
    ],
)
def test_kernel_errors_name_the_model_and_parameter(weights, scale, base, expected):
    state = {name: {"w": torch.ones(2)} for name in weights}
    with pytest.raises(RecycleLinearError) as info:
        merge_state_dicts(state, "recycle_linear", parameters={"weight": weights, "scale": scale}, base=base)
    assert str(info.value).startswith(expected)
    assert info.value.tensor == "w"
    assert info.value.parameter == ("scale" if "scale" in expected else "weight")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_merge_matches_cpu(pool, tmp_path):
    models = [
        {"model": str(pool["ckpt-a"]), "parameters": {"weight": 0.4}},
        {"model": str(pool["ckpt-b"]), "parameters": {"weight": 0.6}},
    ]
    config = {"merge_method": "recycle_linear", "base_model": str(pool["anchor"]), "models": models,
              "parameters": {"scale": 1.3}, "dtype": "float32"}
    cpu = merge_with_mergekit(config, tmp_path / "cpu")
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "gpu"),
              options=MergeOptions(quiet=True, write_model_card=False, cuda=True))
    assert_close(tensors(tmp_path / "gpu"), cpu, atol=1e-5)


@pytest.mark.parametrize("size", [1e-320, 1e38, 1e300])
def test_extreme_weights_normalise_before_summing(size):
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0])
    merged = merge_state_dicts({"a": {"w": a}, "b": {"w": b}}, "recycle_linear", parameters={"weight": {"a": size, "b": size}})
    assert torch.allclose(merged["w"], torch.tensor([3.0, 2.0, 5.0]))
