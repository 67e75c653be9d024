"""The recipe format and `mergekit-recycle validate`: resolved plans and one-line errors."""

import copy
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import invoke, lines, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_recycle import demo_pool
from mergekit_recycle.cli import cli
from mergekit_recycle.constants import POOL_MEMORY_VARIABLE, env_bytes
from mergekit_recycle.errors import RecipeError, SettingError
from mergekit_recycle.recipe import HubCheckpoints, LocalCheckpoint, Recipe, load_recipe, parse_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent


def good_recipe() -> dict:
    """A valid recipe, written next to the `pool` fixture's folders."""
    return {
        "name": "toy-recycle",
        "pool": [
            {"path": "ckpt-a"},
            {"path": "ckpt-b"},
            {"repo": "org/model", "revisions": ["main", "stage2-*"], "subfolders": ["checkpoint-*"]},
        ],
        "base": None,
        "tasks": [
            {"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test", "metric": "acc", "weight": 1.0},
            {"name": "sort", "search": "toy_sort_dev", "holdout": "toy_sort_test", "metric": "acc,none", "limit": 10},
        ],
        "task_paths": ["tasks/"],
        "search": {"budget": 100, "population": None, "sigma0": 0.25, "seed": 0, "scale": 1.0},
        "merge": {"dtype": "float32", "device": "auto"},
        "output": {"run_dir": "runs/toy-recycle", "hub_repo": None, "private": True},
    }


def write(directory: Path, data, name="recipe.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def validate(path: Path, *args: str):
    return CliRunner().invoke(cli, ["validate", str(path), *args])


def test_validate_prints_the_resolved_plan(pool):
    root = pool["root"]
    result = validate(write(root, good_recipe()))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"local  {pool['ckpt-a']}" in out
    assert "hub    org/model  revisions=['main', 'stage2-*']  subfolders=['checkpoint-*']" in out
    assert "add: search=toy_add_dev holdout=toy_add_test metric=acc,none weight=1 (50% of the objective)" in out
    assert "a seeded subset of 10" in out
    assert "budget=100 evaluations" in out and "sigma0=0.25" in out
    assert "select   30% of each search task's documents held back from CMA-ES; the best 4 proposals" in out
    assert f"run_dir={root / 'runs' / 'toy-recycle'}" in out


def test_validate_json_resolves_paths_against_the_recipe_folder(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    result = validate(write(pool["root"], good_recipe()), "--json")
    assert result.exit_code == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["pool"][0]["path"] == str(pool["ckpt-a"])
    assert data["task_paths"] == [str(pool["tasks"])]
    assert data["pool"][2]["revisions"] == ["main", "stage2-*"]


def test_recipe_is_frozen(pool):
    recipe = load_recipe(write(pool["root"], good_recipe()))
    with pytest.raises(Exception):
        recipe.name = "other"
    assert recipe.tasks[1].metric_key == "acc,none"
    assert isinstance(recipe.pool[0], LocalCheckpoint) and isinstance(recipe.pool[2], HubCheckpoints)


def _without(key):
    return lambda r: r["tasks"][0].pop(key)


BAD_RECIPES = {
    "missing field": (_without("metric"), "tasks[0].metric: field required"),
    "unknown top-level key": (lambda r: r.update(optimizer="adam"), "optimizer: extra inputs are not permitted"),
    "unknown nested key": (lambda r: r["search"].update(popsize=4), "search.popsize: extra inputs are not permitted"),
    "wrong type": (lambda r: r["search"].update(budget="lots"), "search.budget: input should be a valid integer"),
    "wrong type in list": (lambda r: r["tasks"][1].update(limit=[1]), "tasks[1].limit: input should be a valid integer"),
    "pool of one": (lambda r: r.update(pool=r["pool"][:1]), "pool: tuple should have at least 2 items"),
    "duplicate local entry": (lambda r: r["pool"].append({"path": "./ckpt-a/"}), "pool[3] duplicates pool[0]"),
    "duplicate hub entry": (
        lambda r: r["pool"].append({"repo": "org/model", "revisions": ["stage2-*", "main"], "subfolders": ["checkpoint-*"]}),
        "pool[3] duplicates pool[2]",
    ),
    "missing local path": (lambda r: r["pool"].append({"path": "ckpt-z"}), "pool[3].path: no such checkpoint directory"),
    "not a checkpoint": (lambda r: r["pool"].append({"path": "tasks"}), "pool[3].path: not a checkpoint directory"),
    "missing base path": (lambda r: r.update(base={"path": "nowhere"}), "base.path: no such checkpoint directory"),
    "missing task path": (lambda r: r["task_paths"].append("more-tasks/"), "task_paths: no such task folder"),
    "task path is a file": (lambda r: r["task_paths"].append("tasks/toy_add_dev.yaml"), "task_paths: not a folder"),
    "pool path is a file": (lambda r: r["pool"].append({"path": "tasks/toy_add_dev.yaml"}), "pool[3].path: not a directory"),
    "holdout searched by another task": (
        lambda r: r["tasks"][1].update(search="toy_add_test"),
        "tasks[0].holdout: 'toy_add_test' is searched by tasks[1]",
    ),
    "boolean as integer": (lambda r: r["search"].update(budget=True), "search.budget: input should be a valid integer"),
    "string as number": (lambda r: r["search"].update(sigma0="0.3"), "search.sigma0: input should be a valid number"),
    "string as boolean": (lambda r: r["output"].update(private="no"), "output.private: input should be a valid boolean"),
    "scale of the wrong shape": (lambda r: r["search"].update(scale=[1.0]), "search.scale: scale is a number or a [lo, hi] pair"),
    "scale not positive": (lambda r: r["search"].update(scale=0), "search.scale: input should be greater than or equal to 0.001"),
    "hub repo twice, other case": (lambda r: r["pool"].append({"repo": "Org/Model", "revisions": ["stage2-*", "main"], "subfolders": ["checkpoint-*"]}), "pool[3] duplicates pool[2]"),
    "revision listed twice": (lambda r: r["pool"][2].update(revisions=["main", "main"]), "pool[2].revisions: 'main' is listed twice"),
    "seed too large": (lambda r: r["search"].update(seed=2**40), "search.seed: input should be less than or equal to 2147483647"),
    "metric that is only a comma": (lambda r: r["tasks"][0].update(metric=" , "), "tasks[0].metric: string should match pattern"),
    "search equals holdout": (
        lambda r: r["tasks"][0].update(holdout="toy_add_dev"),
        "tasks[0]: search and holdout are both 'toy_add_dev'",
    ),
    "negative task weight": (lambda r: r["tasks"][0].update(weight=-1), "tasks[0].weight: input should be greater than or equal to 0"),
    "all task weights zero": (
        lambda r: [t.update(weight=0) for t in r["tasks"]],
        "tasks: every task weight is 0",
    ),
    "pool entry of neither kind": (lambda r: r["pool"].append({"model": "x"}), "pool[3]: a checkpoint needs either `path:`"),
    "bad repo id": (lambda r: r["pool"].append({"repo": "no-slash"}), "pool[3].repo: 'no-slash' is not a Hub repo id"),
    "scale range without base": (lambda r: r["search"].update(scale=[1.0, 1.5]), "search.scale: scale (1.0, 1.5) needs `base:`"),
    "scale range reversed": (lambda r: r["search"].update(scale=[1.5, 1.0]), "search.scale: a scale range needs lo < hi"),
    "holdback of everything": (lambda r: r.update(selection={"holdback": 1.0}),
                               "selection.holdback: input should be less than or equal to 0.9"),
    "holdback as a string": (lambda r: r.update(selection={"holdback": "0.3"}), "selection.holdback: input should be a valid number"),
    "no finalists": (lambda r: r.update(selection={"finalists": 0}), "selection.finalists: input should be greater than or equal to 1"),
    "certainty": (lambda r: r.update(selection={"confidence": 1.0}), "selection.confidence: input should be less than 1"),
    "duplicate task names": (lambda r: r["tasks"][1].update(name="add"), "tasks[1].name: 'add' is used by tasks[0] too"),
    "bad dtype": (lambda r: r["merge"].update(dtype="int4"), "merge.dtype: input should be"),
    "infinite sigma0": (lambda r: r["search"].update(sigma0=float("inf")), "search.sigma0: input should be a finite number"),
    # Out-of-range numbers fail when the recipe is read, not after evaluations (issue 15).
    "task name with a trailing space": (lambda r: r["tasks"][0].update(search="toy_add_dev "),
                                        "tasks[0].search: 'toy_add_dev ' has spaces in it"),
    "limit of 10**30": (lambda r: r["tasks"][1].update(limit=10**30), "tasks[1].limit: input should be less than or equal to 1000000000"),
    "subnormal task weight": (lambda r: r["tasks"][0].update(weight=5e-324), "tasks[0].weight: 5e-324 is out of range"),
    "seed cma refuses": (lambda r: r["search"].update(seed=4294967295), "search.seed: input should be less than or equal to 2147483647"),
    "huge sigma0": (lambda r: r["search"].update(sigma0=1e308), "search.sigma0: input should be less than or equal to 10"),
    "subnormal sigma0": (lambda r: r["search"].update(sigma0=5e-324), "search.sigma0: input should be greater than or equal to 0.000001"),
    "scale range beyond floats": (lambda r: r.update(base={"path": "anchor"}, search={"scale": [1e-300, 1e300]}),
                                  "search.scale: a scale range must lie within [0.001, 1000], got [1e-300, 1e+300]"),
    "long name": (lambda r: r.update(name="x" * 20_000), "name: 'xxxxxxxxxx"),
    "long unknown key": (lambda r: r.update({"k" * 20_000: 1}), "kkkkkkkkkk"),
    "long repo id": (lambda r: r["pool"][2].update(repo="org/" + "m" * 20_000), "pool[2].repo: 'org/mmmmmm"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line_naming_the_field(pool, case):
    mutate, expected = BAD_RECIPES[case]
    data = good_recipe()
    mutate(data)
    path = write(pool["root"], data)
    result = validate(path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert lines(result.stderr) == [lines(result.stderr)[0]], result.stderr
    assert lines(result.stderr)[0].startswith(f"{path}: {expected}"), result.stderr[:1000]
    assert len(result.stderr) < 600, "an echoed value must be cut short"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: [unclosed\n", "line 2: invalid YAML"),
        ("- just\n- a list\n", "expected a mapping of keys to values, got a list"),
        ("", "expected a mapping of keys to values, got empty"),
        ("name: a\nname: b\n", "line 2: invalid YAML: key 'name' is given twice"),
        ("[" * 5000, "invalid YAML"),
    ],
)
def test_unreadable_recipe_files(pool, text, expected):
    path = write(pool["root"], text)
    result = validate(path)
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"{path}: {expected}"] or lines(result.stderr)[0].startswith(f"{path}: {expected}")


def test_unknown_lm_eval_task_is_named(pool):
    data = good_recipe()
    data["tasks"][1]["holdout"] = "toy_sort_tset"
    path = write(pool["root"], data)
    result = validate(path)
    assert result.exit_code == 2
    assert lines(result.stderr) == [
        f"{path}: tasks[1].holdout: unknown lm-eval task 'toy_sort_tset': defined neither in task_paths "
        f"({pool['tasks']}) nor by lm-eval"
    ]
    assert validate(path, "--no-check-tasks").exit_code == 0


def test_console_script_errors_have_no_traceback_unless_debugging(pool):
    data = good_recipe()
    del data["tasks"][0]["metric"]
    path = write(pool["root"], data)
    plain = run_cli("validate", str(path))
    assert plain.returncode == 2
    assert lines(plain.stderr) == [f"{path}: tasks[0].metric: field required"]
    debug = run_cli("validate", str(path), env={"MERGEKIT_RECYCLE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "RecipeError" in debug.stderr


def test_missing_recipe_file(tmp_path):
    result = validate(tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert lines(result.stderr) == [f"{tmp_path / 'nope.yaml'}: recipe file not found"]


def test_demo_pool_recipe_and_repo_recipe_agree(pool_dir, tmp_path):
    """recipes/pool.yaml describes the same job as the recipe the demo pool writes."""
    toy_pool = tmp_path / ".toy-pool"
    for run in demo_pool.PLANS["default"].post_training:  # validate reads the weights' headers: real ones
        shutil.copytree(pool_dir / "ckpt-a", toy_pool / run.name)
    (toy_pool / "tasks").mkdir()
    (toy_pool / "recipe.yaml").write_text(demo_pool.plan_recipe(demo_pool.PLANS["default"]))
    demo_pool.write_tasks(toy_pool / "tasks", demo_pool.evaluation_examples(seed=0, dev_size=5, test_size=5))
    built = load_recipe(toy_pool / "recipe.yaml")
    text = (REPO_ROOT / "recipes" / "pool.yaml").read_text()
    (tmp_path / "recipes").mkdir()
    shipped = load_recipe(write(tmp_path / "recipes", text, "pool.yaml"))
    assert shipped.pool == built.pool and shipped.tasks == built.tasks and shipped.task_paths == built.task_paths
    assert shipped.search == built.search and shipped.merge == built.merge and shipped.selection == built.selection
    result = validate(tmp_path / "recipes" / "pool.yaml")
    assert result.exit_code == 0, result.stderr


# --- random recipes: a valid Recipe or a clean RecipeError, nothing else -----------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["ckpt-a", "ckpt-b", "anchor", "tasks", "org/model", "acc", "main", "-1"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6
)
local_entries = st.sampled_from(["ckpt-a", "ckpt-b", "ckpt-c", "anchor"]).map(lambda p: {"path": p})
hub_entries = st.fixed_dictionaries(
    {"repo": st.sampled_from(["org/a", "org/b", "lab/model-7b"])},
    optional={
        "revisions": st.lists(st.sampled_from(["main", "stage2-*", "v1.0"]), min_size=1, max_size=2, unique=True),
        "subfolders": st.lists(st.sampled_from(["checkpoint-*", "final"]), min_size=1, max_size=2, unique=True),
    },
)
valid_tasks = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["add", "sort", "shift", "code", "chat"]),
        "search": st.sampled_from(["toy_add_dev", "toy_sort_dev"]),
        "holdout": st.sampled_from(["toy_add_test", "toy_sort_test"]),
        "metric": st.sampled_from(["acc", "acc,none", "acc_norm"]),
    },
    optional={"weight": st.floats(0.1, 3), "limit": st.one_of(st.none(), st.integers(1, 50))},
)
valid_recipes = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["toy", "toy-recycle", "lab.v2"]),
        "pool": st.lists(st.one_of(local_entries, hub_entries), min_size=2, max_size=5, unique_by=lambda e: str(sorted(e.items()))),
        "tasks": st.lists(valid_tasks, min_size=1, max_size=3, unique_by=lambda t: t["name"]),
    },
    optional={
        "base": st.one_of(st.none(), local_entries, hub_entries),
        "task_paths": st.lists(st.just("tasks"), max_size=1),
        "search": st.fixed_dictionaries(
            {},
            optional={
                "budget": st.integers(1, 500), "population": st.one_of(st.none(), st.integers(2, 20)),
                "sigma0": st.floats(0.01, 1), "seed": st.integers(0, 99), "scale": st.just(1.0),
            },
        ),
        "merge": st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["float32", "bfloat16"]), "device": st.sampled_from(["auto", "cpu", "cuda:0"])}),
        "output": st.fixed_dictionaries({}, optional={"run_dir": st.just("runs/x"), "hub_repo": st.one_of(st.none(), st.just("org/merged")), "private": st.booleans()}),
    },
)


def _paths(value, prefix=()):
    """Every key path inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, prefix + (index,))


@st.composite
def recipes(draw):
    """Valid recipes, and valid recipes with one value replaced, removed or added at random."""
    data = draw(valid_recipes)
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from([p for p in _paths(data) if p]))
        parent = data
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(values)
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=recipes())
def test_random_recipes_give_a_recipe_or_a_clean_error(pool_dir, data):
    source = pool_dir / "random.yaml"
    try:
        recipe = parse_recipe(copy.deepcopy(data), pool_dir, source=source)
    except RecipeError as error:
        text = str(error)
        assert text.startswith(f"{source}: ") and "\n" not in text and len(text) < 500
        return
    assert isinstance(recipe, Recipe)
    # A valid recipe survives a round trip through its own resolved form.
    assert parse_recipe(recipe.model_dump(mode="json"), pool_dir, source=source) == recipe


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=recipes())
def test_random_recipe_files_through_the_cli(pool_dir, data):
    path = pool_dir / "random-cli.yaml"
    path.write_text(yaml.safe_dump(data))
    result = validate(path, "--no-check-tasks")
    assert result.exit_code in (0, 2), result.stderr
    if result.exit_code == 2:
        assert len(lines(result.stderr)) == 1 and lines(result.stderr)[0].startswith(f"{path}: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- issue 15: paths, task definitions, metrics and settings, each refused with a named line ------

BAD_PATHS = {
    "pool entry is a symlink loop": (lambda r: r["pool"].append({"path": "loop"}), "pool[3].path: loop is a symlink loop"),
    "task path is a symlink loop": (lambda r: r["task_paths"].append("loop"), "task_paths: loop is a symlink loop"),
    "base is a symlink loop": (lambda r: r.update(base={"path": "loop"}), "base.path: loop is a symlink loop"),
    "run folder is a symlink loop": (lambda r: r["output"].update(run_dir="loop/run"), "output.run_dir: loop/run is a symlink loop"),
    "pool entry is an empty folder": (lambda r: r["pool"].append({"path": "empty"}), "pool[3].path: an empty folder (no config.json)"),
    "path component too long": (lambda r: r["pool"].append({"path": "p" * 300}), "pool[3].path: ppppp"),
}


def test_bad_paths_name_the_recipe_field(pool):
    root = pool["root"]
    (root / "loop").symlink_to(root / "loop-back")
    (root / "loop-back").symlink_to(root / "loop")
    (root / "empty").mkdir()
    for case, (mutate, expected) in BAD_PATHS.items():
        data = good_recipe()
        mutate(data)
        path = write(root, data)
        result = validate(path, "--no-check-tasks")
        assert result.exit_code == 2, (case, result.stderr)
        assert len(lines(result.stderr)) == 1 and lines(result.stderr)[0].startswith(f"{path}: {expected}"), (case, result.stderr)
        assert len(result.stderr) < 600, case


def _damage(tasks: Path, case: str) -> None:
    """Break toy_add_dev's definition or data in one of the ways a user does."""
    task_file = tasks / "toy_add_dev.yaml"
    text = task_file.read_text()
    if case == "missing data file":
        (tasks / "toy_add_dev.jsonl").unlink()
    elif case == "bad Jinja filter":
        task_file.write_text(text.replace("doc_to_text: question", 'doc_to_text: "{{question|no_such_filter}}"'))
    elif case == "empty data file":
        (tasks / "toy_add_dev.jsonl").write_text("")
    elif case == "custom loader that raises":
        with open(tasks / "toy_data.py", "a") as loader:
            loader.write("\n\ndef broken(**_):\n    raise ValueError('the loader broke')\n")
        task_file.write_text(text.replace("toy_data.load_jsonl", "toy_data.broken"))
    elif case == "download while offline":  # conftest sets HF_DATASETS_OFFLINE=1
        task_file.write_text(text.replace("custom_dataset: !function toy_data.load_jsonl", "dataset_path: some/dataset"))


TASK_DAMAGES = {
    "missing data file": "its data file is missing",
    "bad Jinja filter": "a template does not work (TemplateAssertionError: No filter named 'no_such_filter'",
    "empty data file": "its data has no documents",
    "custom loader that raises": "lm-eval cannot build it: ValueError: the loader broke",
    "download while offline": "its dataset 'some/dataset' is not in the local cache",
}


def test_broken_task_definitions_name_the_task_and_the_field(pool, tmp_path):
    """Each is found by validate (and so before optimize evaluates anything), with no model run. Data
    that is not in the local cache while offline is no fault of the recipe: validate notes it (exit 0),
    optimize stops on it in one line before anything is evaluated."""
    for case, expected in TASK_DAMAGES.items():
        tasks = tmp_path / case.replace(" ", "-")
        shutil.copytree(pool["tasks"], tasks)
        _damage(tasks, case)
        path = _local_recipe(pool, tmp_path / case.replace(" ", "-"), tasks)
        started = time.monotonic()
        result = validate(path)
        line = f"tasks[0].search: lm-eval task 'toy_add_dev' ({tasks / 'toy_add_dev.yaml'}): {expected}"
        if case == "download while offline":
            assert result.exit_code == 0 and lines(result.stderr)[0].startswith(f"note: {line}"), result.stderr
            result = invoke("optimize", str(path), "--quiet")
            assert not (tmp_path / case.replace(" ", "-") / "run").exists()  # a failed start leaves nothing
        assert result.exit_code == 2, (case, result.stderr)
        assert time.monotonic() - started < 20, case
        assert lines(result.stderr) == [lines(result.stderr)[0]] and lines(result.stderr)[0].startswith(
            f"{path}: {line}"), (case, result.stderr)


def _local_recipe(pool, tmp_path, tasks: Path) -> Path:
    """A small recipe over the local checkpoints only (good_recipe's Hub entry cannot be reached)."""
    data = good_recipe()
    data["pool"] = [{"path": "ckpt-a"}, {"path": "ckpt-b"}]
    data["task_paths"] = [str(tasks)]
    data["output"]["run_dir"] = str(tmp_path / "run")
    data["search"]["budget"] = 2
    return write(pool["root"], data)


def test_a_holdout_metric_the_task_does_not_report_is_refused_before_any_evaluation(pool, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(pool["tasks"], tasks)
    holdout = tasks / "toy_sort_test.yaml"
    holdout.write_text(holdout.read_text().replace("metric: acc\n", "metric: acc_norm\n"))
    path = _local_recipe(pool, tmp_path, tasks)
    expected = (f"{path}: tasks[1].metric: lm-eval task 'toy_sort_test' (tasks[1].holdout) reports no metric "
                "'acc,none' (it reports: acc_norm)")
    assert lines(validate(path).stderr) == [expected]
    result = invoke("optimize", str(path), "--quiet")
    assert result.exit_code == 2 and lines(result.stderr) == [expected], result.stderr
    journal = tmp_path / "run" / "journal.jsonl"
    assert not journal.exists() or '"evaluation"' not in journal.read_text()
    # The Python API checks it too, once the scorers are built and before anything is scored.
    from mergekit_recycle.candidate import ResidentEvaluator
    from mergekit_recycle.pool import resolve_pool

    recipe = load_recipe(path)
    with pytest.raises(RecipeError, match="tasks\\[1\\].metric: .* reports no metric 'acc,none'"):
        ResidentEvaluator(recipe, resolve_pool(recipe, path), "cpu", path)


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-1", "12Q"])
def test_a_pool_memory_setting_that_is_no_size_is_one_line(monkeypatch, value):
    monkeypatch.setenv(POOL_MEMORY_VARIABLE, value)
    with pytest.raises(SettingError, match=f"^{POOL_MEMORY_VARIABLE}='{re.escape(value)}': expected a size in bytes"):
        env_bytes(POOL_MEMORY_VARIABLE)


def test_a_pool_memory_setting_that_is_no_size_stops_optimize_with_nothing_journaled(pool, tmp_path):
    path = _local_recipe(pool, tmp_path, pool["tasks"])
    result = invoke("optimize", str(path), "--quiet", env={POOL_MEMORY_VARIABLE: "inf"})
    assert result.exit_code == 2, result.stderr
    assert lines(result.stderr) == [f"{POOL_MEMORY_VARIABLE}='inf': expected a size in bytes, e.g. 8G, 512M or 1000000"]
    journal = tmp_path / "run" / "journal.jsonl"
    assert not journal.exists() or '"evaluation"' not in journal.read_text()


def test_the_default_run_folder_is_in_the_recipe_folder_whatever_the_working_directory(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = good_recipe()
    del data["output"]["run_dir"]
    result = validate(write(pool["root"], data), "--no-check-tasks")
    assert result.exit_code == 0, result.stderr
    assert f"run_dir={pool['root'] / 'runs' / 'toy-recycle'} (the default: runs/toy-recycle in the recipe's folder)" \
        in result.stdout
