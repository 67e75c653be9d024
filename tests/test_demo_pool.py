"""The demo pool, built once at the `small` size through the CLI and checked as a user would."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from conftest import lines, run_cli
from mergekit_recycle.demo_pool import (
    DESIGN_PLAN,
    DESIGNS,
    MANIFEST,
    PLANS,
    SIZES,
    SKILLS,
    PoolPlan,
    char_tokenizer,
    evaluation_examples,
    plan_for,
    plan_recipe,
    read_summary,
    write_tasks,
)
from mergekit_recycle.demo_pool.build import content_fingerprint
from mergekit_recycle.demo_pool.training import TrainingRun, UntilLearnt, training_batches
from mergekit_recycle.recipe import load_recipe

SMALL = PLANS["small"]
POST = [run.name for run in SMALL.post_training]
# The content fingerprints of `demo-pool --size small --seed 0` recorded so far, by CPU: the same on AMD EPYC
# under varied ATen, MKL and libm instruction sets, another on Intel Xeon (see README, The demo pool).
SMALL_SEED_0 = {"79d9747f41783de4": "AMD EPYC", "895bb31d3967e2fe": "Intel Xeon (AVX512)"}


def tree(root: Path) -> dict:
    """Every file under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def holdout_scores(summary, checkpoint):
    return {task.skill: 100 * summary.scores[checkpoint][task.holdout] for task in summary.tasks}


def test_cli_builds_a_pool_with_a_summary(small_pool):
    directory, result = small_pool
    assert result.returncode == 0, result.stderr
    assert "[1/7] base" in result.stderr and "done in" in result.stderr  # progress while training
    table = result.stdout
    for checkpoint in ["base"] + POST:
        row = next(line for line in table.splitlines() if line.startswith(checkpoint + " "))
        assert row.count("/") == len(SKILLS) + 1  # dev / test per skill, and the macro-average
    for name in ["base"] + POST:
        files = {p.name for p in (directory / name).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    summary = read_summary(directory)
    assert summary.size == "small" and summary.seed == 0 and list(summary.checkpoints) == ["base"] + POST
    assert f"content fingerprint: {summary.content_fingerprint} " in table


def test_the_small_pool_is_the_recorded_bytes(small_pool):
    """The cross-machine check: this machine built the pool that every other x86-64 machine builds."""
    directory, _ = small_pool
    summary = read_summary(directory)
    assert summary.content_fingerprint in SMALL_SEED_0
    # What is on disk is what the summary says.
    assert content_fingerprint(directory, list(summary.checkpoints), summary.tasks) == summary.content_fingerprint


def test_recipe_validates_and_checkpoints_load_unchanged(small_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = small_pool
    recipe = load_recipe(directory / "recipe.yaml")
    assert [entry.path for entry in recipe.pool] == [directory.resolve() / name for name in POST]
    assert recipe.task_paths == (directory.resolve() / "tasks",)
    result = run_cli("validate", str(directory / "recipe.yaml"))
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(directory / "post-1")
    assert tokenizer("12+34=").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer("sort cab=").input_ids, skip_special_tokens=True) == "sort cab="
    model = AutoModelForCausalLM.from_pretrained(directory / "post-1")
    assert model.config.model_type == "llama" and model.config.hidden_size <= 128


def test_checkpoints_trade_skills_off(small_pool):
    summary = read_summary(small_pool[0])
    scores = {checkpoint: holdout_scores(summary, checkpoint) for checkpoint in POST}
    best = {skill: max(scores[c][skill] for c in POST) for skill in SKILLS}
    leaders = {skill: {c for c in POST if scores[c][skill] == best[skill]} for skill in SKILLS}
    assert not set.intersection(*leaders.values()), f"one checkpoint leads every skill: {leaders}"
    for checkpoint in POST:
        assert any(scores[checkpoint][s] < best[s] - 2 for s in SKILLS), f"{checkpoint} is near the best everywhere"


def test_uniform_merge_beats_the_mean_checkpoint(small_pool, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_recycle.evaluate import Scorer

    directory, _ = small_pool
    summary = read_summary(directory)
    config = tmp_path / "uniform.yml"
    config.write_text(
        "merge_method: recycle_linear\ndtype: float32\nmodels:\n"
        + "".join(f"  - model: {directory / name}\n    parameters: {{weight: 1.0}}\n" for name in POST)
    )
    result = run_cli("merge", str(config), str(tmp_path / "uniform"))
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    scorer = Scorer(model, AutoTokenizer.from_pretrained(tmp_path / "uniform"),
                    [task.holdout for task in summary.tasks], [directory / "tasks"])
    uniform = sum(metrics["acc"] for metrics in scorer.score().values()) / len(summary.tasks)
    mean_checkpoint = sum(summary.macro(c, "holdout") for c in POST) / len(POST)
    assert uniform > mean_checkpoint, (uniform, mean_checkpoint)


def test_tasks_are_disjoint_multiple_choice_and_unseen_in_training(small_pool):
    directory, _ = small_pool
    tasks = directory / "tasks"
    questions = {}
    for path in tasks.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert all(len(row["choices"]) == 4 and len(set(row["choices"])) == 4 for row in rows)
        questions[path.stem] = {row["question"] for row in rows}
    assert len(questions["toy_add_dev"]) == SMALL.dev_size and len(questions["toy_add_test"]) == SMALL.test_size
    for skill in SKILLS:
        assert not questions[f"toy_{skill}_dev"] & questions[f"toy_{skill}_test"]
    evaluation = frozenset(set().union(*questions.values()))
    run = TrainingRun(name="probe", mix={s: 1.0 for s in SKILLS}, steps=1, learning_rate=1e-3, batch_size=256, schedule="constant")
    tokenizer = char_tokenizer()
    stream = training_batches(run, tokenizer, random.Random(0), evaluation)
    seen = set()
    for _ in range(40):
        ids, _labels = next(stream)
        seen |= {tokenizer.decode(row[1:], skip_special_tokens=True).split("=")[0] + "=" for row in ids}
    assert len(seen) > 5000 and not seen & evaluation


def test_same_seed_is_a_no_op(small_pool):
    directory, _ = small_pool
    before = tree(directory)
    result = run_cli("demo-pool", str(directory), "--size", "small", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr and "post-1" in result.stdout
    assert tree(directory) == before


def test_a_folder_holding_another_pool_is_refused_untouched(small_pool):
    directory, _ = small_pool
    before = tree(directory)
    for args, found in [(["--seed", "1", "--size", "small"], "--seed 0 --size small"),
                        (["--seed", "0"], "--seed 0 --size small"),
                        (["--size", "small", "--design", "experts"], "--seed 0 --size small")]:
        result = run_cli("demo-pool", str(directory), *args)
        assert result.returncode == 2
        assert len(lines(result.stderr)) == 1, result.stderr
        assert result.stderr.startswith(f"{directory}: already holds a demo pool built with {found}; "), result.stderr
    assert result.stderr.rstrip().endswith("to build --design experts --seed 0 --size small"), result.stderr
    assert tree(directory) == before


def test_unusable_folders_give_one_line(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "link").symlink_to(occupied)
    cases = [
        (occupied, "is not empty and holds no demo pool"),
        (tmp_path / "link", "give the pool a folder of its own"),
        (a_file, "exists and is not a folder"),
        (a_file / "pool", "cannot write here"),
    ]
    for target, message in cases:
        result = run_cli("demo-pool", str(target), "--size", "small")
        assert result.returncode == 2, result.stderr
        assert len(lines(result.stderr)) == 1 and result.stderr.startswith(f"{target}: {message}"), result.stderr
    assert (occupied / "notes.txt").read_text() == "mine" and sorted(os.listdir(occupied)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a-file", "link", "occupied"]  # no leftover build folders
    here = run_cli("demo-pool", ".", "--size", "small", cwd=occupied)
    assert here.returncode == 2 and lines(here.stderr) == [".: give the pool a folder of its own (not '.', '..', a link or a mount point)"]


# --- the build itself, through the API with a plan of a few steps ---------------------------

# A few steps of each run; the pretraining without its until-learnt rule, which would train on.
TINY = SMALL.model_copy(update={
    "size": "tiny",
    "pretraining": SMALL.pretraining.model_copy(update={"steps": 4, "until_learnt": None}),
    "post_training": tuple(run.model_copy(update={"steps": 2}) for run in SMALL.post_training[:2]),
    "dev_size": 8,
    "test_size": 8,
})


@pytest.fixture(scope="module")
def tiny_pools(tmp_path_factory) -> dict:
    """TINY pools, by name: seed 0, seed 0 built by a caller with other CPU settings, and seed 1."""
    from mergekit_recycle.demo_pool import build_pool

    root = tmp_path_factory.mktemp("tiny")
    build_pool(root / "seed-0", seed=0, size=TINY)
    with pytest.MonkeyPatch.context() as patch:
        # What another CPU, or a caller's own settings, would give the training if it inherited them.
        for name, value in {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}.items():
            patch.setenv(name, value)
        build_pool(root / "seed-0-other-cpu", seed=0, size=TINY)
    build_pool(root / "seed-1", seed=1, size=TINY)
    return {path.name: path for path in root.iterdir()}


def test_same_seed_same_bytes_whatever_the_callers_cpu_settings_other_seed_other_pool(tiny_pools):
    summaries = {name: read_summary(path) for name, path in tiny_pools.items()}
    for name in summaries["seed-0"].checkpoints:
        ours = (tiny_pools["seed-0"] / name / "model.safetensors").read_bytes()
        assert (tiny_pools["seed-0-other-cpu"] / name / "model.safetensors").read_bytes() == ours, name
        assert (tiny_pools["seed-1"] / name / "model.safetensors").read_bytes() != ours, name
    data = [(tiny_pools[pool] / "tasks" / "toy_add_test.jsonl").read_bytes() for pool in ("seed-0", "seed-0-other-cpu", "seed-1")]
    assert data[0] == data[1] != data[2]
    prints = [summaries[pool].content_fingerprint for pool in ("seed-0", "seed-0-other-cpu", "seed-1")]
    assert prints[0] == prints[1] != prints[2] and len(prints[0]) == 16


def test_training_never_sees_a_question_the_tasks_ask(tiny_pools, tmp_path, monkeypatch):
    from mergekit_recycle.demo_pool import build

    excluded = []
    real_train = build.train

    def recording_train(*args, exclude, **kwargs):
        excluded.append(exclude)
        return real_train(*args, exclude=exclude, **kwargs)

    monkeypatch.setattr(build, "train", recording_train)
    build.train_pool(tmp_path, seed=0, plan=TINY)  # what the build's training process runs
    asked = {json.loads(line)["question"] for path in (tiny_pools["seed-0"] / "tasks").glob("*.jsonl")
             for line in path.read_text().splitlines()}
    assert len(excluded) == 3 and all(exclude == asked for exclude in excluded)
    assert len(asked) == 3 * (TINY.dev_size + TINY.test_size)


def _with_rule(threshold: float) -> PoolPlan:
    """TINY with an until-learnt rule on its pretraining: probes at steps 4 and 6, then 2 steps of anneal."""
    rule = UntilLearnt(threshold=threshold, every=2, max_steps=6, anneal=2)
    return TINY.model_copy(update={"pretraining": TINY.pretraining.model_copy(update={"schedule": "constant", "until_learnt": rule})})


def test_the_base_trains_until_a_probe_finds_every_skill_learnt(tmp_path):
    """The rule: a run that passes its probe anneals and stops; one that never does fails the build in one line."""
    from mergekit_recycle.demo_pool import build_pool
    from mergekit_recycle.errors import DemoPoolError

    lines_seen = []
    build_pool(tmp_path / "learnt", seed=0, size=_with_rule(0.0), report=lines_seen.append)
    assert any(line.startswith("[1/3] base") and "step 4: probe add" in line and "every skill learnt; annealing for 2 steps" in line
               for line in lines_seen), lines_seen
    assert any(line.startswith("[1/3] base") and "step 6/6" in line for line in lines_seen), lines_seen
    with pytest.raises(DemoPoolError, match=r"run base did not learn add, .* in 6 steps \(probe add"):
        build_pool(tmp_path / "never", seed=0, size=_with_rule(1.0))
    assert sorted(os.listdir(tmp_path)) == ["learnt"]
    assert SMALL.pretraining.until_learnt is not None and plan_for("forgetting", "default").pretraining == SMALL.pretraining


def test_the_probe_is_lm_evals_multiple_choice_accuracy_on_training_questions(small_pool):
    """The rule's probe scores as lm-eval does (on the pool's own test questions it gives the
    summary's test accuracy), and draws its own questions from the training distribution, none a task's."""
    from transformers import AutoModelForCausalLM

    from mergekit_recycle.demo_pool.training import probe_accuracy, probe_examples

    directory, _ = small_pool
    summary = read_summary(directory)
    model = AutoModelForCausalLM.from_pretrained(directory / "base").eval()
    tests = {task.skill: [json.loads(line) for line in (directory / "tasks" / f"{task.holdout}.jsonl").read_text().splitlines()]
             for task in summary.tasks}
    accuracy = probe_accuracy(model, char_tokenizer(), tests)
    for task in summary.tasks:
        assert abs(accuracy[task.skill] - summary.scores["base"][task.holdout]) <= 1 / 300, task.skill
    asked = {row["question"] for path in (directory / "tasks").glob("*.jsonl") for row in map(json.loads, path.read_text().splitlines())}
    probe = probe_examples(SMALL.pretraining, seed=0, exclude=frozenset(asked))
    assert set(probe) == set(SKILLS) and all(len(rows) == 200 for rows in probe.values())
    assert not {row["question"] for rows in probe.values() for row in rows} & asked


def test_an_interrupted_build_leaves_nothing_behind(tmp_path):
    from mergekit_recycle.demo_pool import build_pool

    def report(line: str) -> None:
        if line.startswith("[2/3]"):  # Ctrl-C during the first post-training run
            raise KeyboardInterrupt

    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(KeyboardInterrupt):
            build_pool(target, seed=0, size=TINY, report=report)
    assert sorted(os.listdir(tmp_path)) == ["empty"] and os.listdir(tmp_path / "empty") == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("target", ["read-only/pool", "read-only"])
def test_read_only_folders_give_one_line(tmp_path, target):
    """A new pool under a read-only folder, or an existing empty folder that is read-only."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        result = run_cli("demo-pool", str(tmp_path / target), "--size", "small")
    finally:
        read_only.chmod(0o700)
    assert result.returncode == 2 and len(lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith(f"{tmp_path / target}: cannot write here")
    assert os.listdir(read_only) == []


def test_an_incomplete_pool_is_not_taken_for_a_built_one(tiny_pools, tmp_path):
    from mergekit_recycle.demo_pool import build_pool

    shutil.copytree(tiny_pools["seed-0"], tmp_path / "pool")
    (tmp_path / "pool" / "post-2" / "model.safetensors").unlink()
    with pytest.raises(FileExistsError, match="incomplete demo pool .post-2/model.safetensors is missing"):
        build_pool(tmp_path / "pool", seed=0, size=TINY)


# --- the designs ------------------------------------------------------------------------------

def test_the_forgetting_plans_keep_their_fingerprints():
    """A plan's fingerprint (in demo-pool.json) changes only with the plan or FORMAT: designs and
    architectures added at their defaults left the forgetting plans' unchanged."""
    assert PLANS == DESIGN_PLAN["forgetting"]
    assert {size: plan.fingerprint() for size, plan in PLANS.items()} == {"default": "6a69c31535bedfd7", "small": "ac354f2d523b47fa"}
    prints = [plan_for(design, size).fingerprint() for design in DESIGNS for size in SIZES]
    assert len(set(prints)) == len(prints)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("design", DESIGNS)
def test_every_design_plans_a_valid_recipe(tmp_path, design, size):
    plan = plan_for(design, size)
    assert plan.design == design and plan.size == size and plan.pretraining.name == "base"
    assert "base" not in plan.pool() and len(plan.pool()) >= 3
    assert (plan.dev_size, plan.test_size) == ((300, 1000) if size == "default" else (100, 300))
    for name in plan.pool():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text(plan_recipe(plan))
    write_tasks(tmp_path / "tasks", evaluation_examples(seed=0, dev_size=5, test_size=5))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert [entry.path for entry in recipe.pool] == [tmp_path.resolve() / name for name in plan.pool()]
    assert [task.name for task in recipe.tasks] == list(SKILLS) and recipe.base is None and recipe.search.budget == 200


def test_a_plan_is_checked_when_made():
    run = SMALL.post_training[0]
    bad = [
        {"post_training": (run.model_copy(update={"start": "post-9"}),)},  # starts from no checkpoint
        {"post_training": (run, run)},  # two runs save the same checkpoint
        {"architecture": "gpt2"},
        {"pretraining": SMALL.pretraining.model_copy(update={"start": "base"})},
    ]
    for update in bad:
        with pytest.raises(ValueError):
            PoolPlan.model_validate(SMALL.model_copy(update=update).model_dump())
    with pytest.raises(ValueError, match="saves"):
        TrainingRun(name="x", mix={"add": 1}, steps=10, learning_rate=1e-3, batch_size=4, schedule="constant", saves=(5,))
    with pytest.raises(ValueError):
        plan_for("nope", "small")


def _tiny(design: str, **runs) -> PoolPlan:
    """`design`'s small plan with runs of a few steps and a handful of questions."""
    plan = plan_for(design, "small").model_dump()
    plan.update(size="tiny", dev_size=8, test_size=8)
    plan["pretraining"].update(steps=4, until_learnt=None)
    for run in plan["post_training"]:
        run.update(runs.get(run["name"], {"steps": 2}))
    return PoolPlan.model_validate(plan)


def test_a_run_saved_at_several_steps_and_runs_started_from_them(tmp_path):
    """The trajectory design: a checkpoint saved mid-run is the run stopped there, bit for bit."""
    from safetensors.torch import load_file

    from mergekit_recycle.demo_pool import build_pool

    plan = _tiny("trajectory", step={"steps": 6, "saves": (3, 6)}, **{"anneal-300": {"steps": 2, "start": "step-3"}})
    assert plan.pool() == ("step-3", "step-6", "anneal-300")
    summary = build_pool(tmp_path / "pool", seed=0, size=plan)
    assert summary.design == "trajectory" and list(summary.checkpoints) == ["base", "step-3", "step-6", "anneal-300"]
    assert summary.checkpoints["step-3"].startswith("step 3 of run step (")
    assert json.loads((tmp_path / "pool" / MANIFEST).read_text())["design"] == "trajectory"
    assert [entry.path.name for entry in load_recipe(tmp_path / "pool" / "recipe.yaml").pool] == list(plan.pool())
    stopped = plan.model_copy(update={"post_training": (plan.post_training[0].model_copy(update={"steps": 3, "saves": ()}),)})
    build_pool(tmp_path / "stopped", seed=0, size=stopped)
    assert (tmp_path / "stopped" / "step" / "model.safetensors").read_bytes() == (tmp_path / "pool" / "step-3" / "model.safetensors").read_bytes()
    weights = {name: load_file(tmp_path / "pool" / name / "model.safetensors") for name in plan.pool()}
    assert all(not weights["step-3"][key].equal(weights["step-6"][key]) for key in weights["step-3"] if key.endswith("proj.weight"))


def test_a_qwen2_pool_has_tied_embeddings(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mergekit_recycle.demo_pool import build_pool

    summary = build_pool(tmp_path / "pool", seed=0, size=_tiny("qwen2"))
    assert summary.design == "qwen2" and set(summary.scores) == {"base"} | {run.name for run in SMALL.post_training}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pool" / "post-1")
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(tmp_path / "pool" / "post-1" / "model.safetensors")
