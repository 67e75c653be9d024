"""mergekit-recycle as a mergekit plugin: plain `mergekit-yaml` merges our YAMLs, a fresh interpreter
knows recycle_linear as soon as it imports mergekit's registry, and an interpreter start imports
neither mergekit nor torch."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from test_merge_cli import all_tensors
from mergekit.options import MergeOptions

from mergekit_recycle.merge import merge_yaml
from mergekit_recycle.mergekit_yaml import write_merge_config
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe


def python(code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter of the test's environment (its site-packages, hence the installed .pth)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_plain_mergekit_yaml_merges_a_proposal_as_merge_does(pool, tmp_path):
    """One fresh interpreter (one start-up of mergekit's imports, for CI's time): it starts without
    mergekit or mergekit_recycle, keeps one hook finder through a reload, survives a second finder,
    knows recycle_linear and the corrections once it imports mergekit's registry, then runs
    mergekit's own `mergekit-yaml` console script on a proposal this project wrote."""
    recipe = pool["root"] / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "plugin", "pool": [{"path": name} for name in ("ckpt-a", "ckpt-b", "ckpt-c")], "base": {"path": "anchor"},
        "tasks": [{"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test", "metric": "acc"}],
        "task_paths": ["tasks/"], "search": {"scale": 1.25},
    }))
    proposal = write_merge_config(tmp_path / "000010.yaml", Merge(weights={"ckpt-a": 0.5, "ckpt-b": 0.2, "ckpt-c": 0.3},
                                  scale=1.25), resolve_pool(load_recipe(recipe), recipe), "float32", "proposal 10")
    merge_yaml(proposal, tmp_path / "ours", MergeOptions(quiet=True))

    script = Path(sys.executable).parent / "mergekit-yaml"
    result = python(
        "import importlib, runpy, sys\n"
        # The .pth imports the hook only: the package comes from sys.path as it is once the program runs.
        "assert not {m.split('.')[0] for m in sys.modules} & {'mergekit', 'torch', 'transformers', 'mergekit_recycle'}, "
        "sorted(sys.modules)\n"
        # A reloaded hook module has a new finder class: install still sees the finder already there.
        "import mergekit_recycle_hook as hook\n"
        "importlib.reload(hook).install()\n"
        "print(sum(getattr(finder, 'mergekit_recycle_hook', False) is True for finder in sys.meta_path))\n"
        # Two finders anyway, each asking every other finder: neither recurses.
        "sys.meta_path.insert(0, hook.PostImportFinder())\n"
        "import mergekit.merge_methods.registry as registry\n"
        "print(registry.get('recycle_linear').spec.name)\n"
        "from mergekit.architecture.json_definitions import NAME_TO_ARCH\n"
        "arch = NAME_TO_ARCH['GPTNeoXForCausalLM'][0]\n"
        "print(any('inv_freq' in w.name for m in arch.modules.values()"
        " for w in m.architecture.definition.layer_templates.weights))\n"
        f"sys.argv = [{str(script)!r}, {str(proposal)!r}, {str(tmp_path / 'plain')!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # one finder after reload and install; registered; GPT-NeoX's buffers dropped
    assert result.stdout.split()[:3] == ["1", "recycle_linear", "False"], result.stdout
    ours, plain = all_tensors(tmp_path / "ours"), all_tensors(tmp_path / "plain")
    assert ours.keys() == plain.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], plain[name]), name
    assert (tmp_path / "plain" / "mergekit_config.yml").read_text() == proposal.read_text()


def test_the_command_line_starts_without_mergekit():
    """`mergekit-recycle --help` (and so the start of every command) loads neither mergekit nor torch,
    and still lists `merge`."""
    result = python("import sys\nfrom mergekit_recycle.cli import main\nsys.argv = ['mergekit-recycle', '--help']\n"
                    "try:\n    main()\nexcept SystemExit:\n    pass\n"
                    "print(sorted({m.split('.')[0] for m in sys.modules} & {'mergekit', 'torch', 'transformers', 'peft'}))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  merge " in result.stdout and result.stdout.splitlines()[-1] == "[]", result.stdout
