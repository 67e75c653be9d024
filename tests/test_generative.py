"""Generative (generate_until) tasks, num_fewshot and apply_chat_template: scored through the resident
model exactly as lm-eval's own HFLM scores them, and a run's fingerprint unchanged where they are unset."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import invoke, lines

from mergekit_recycle import demo_pool
from mergekit_recycle.demo_pool.build import content_fingerprint
from mergekit_recycle.errors import RecipeError, TaskDefinitionError
from mergekit_recycle.evaluate import Scorer
from mergekit_recycle.journal import Journal
from mergekit_recycle.optimize import fingerprint
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.records import EvaluationRecord
from mergekit_recycle.recipe import load_recipe, parse_recipe

# Rows per batch of every scorer here and of lm-eval's HFLM: the same batches give the same generations.
BATCH_SIZE = 64
# Documents of each task in the trimmed copy: enough to tell checkpoints apart, few enough to be cheap.
DEV_ROWS, TEST_ROWS = 40, 60
# A chat template in the demo tokenizer's characters: user turns prefixed with "q: ", answers followed by a space.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}q: {{ m['content'] }}"
                 "{% else %}{{ m['content'] }} {% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def gen_pool(small_pool, tmp_path_factory) -> Path:
    """A copy of the small demo pool with its generative tasks written, each task's data cut to a few
    dozen documents (the shipped pool is left as it is)."""
    copy = tmp_path_factory.mktemp("generative") / "pool"
    shutil.copytree(small_pool[0], copy)
    demo_pool.write_generative_tasks(copy / "tasks")
    for _, dev, test in demo_pool.skill_tasks():
        for task, rows in ((dev, DEV_ROWS), (test, TEST_ROWS)):
            path = copy / "tasks" / f"{task}.jsonl"
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    return copy


def write_recipe(folder: Path, tasks, pool=("post-1", "post-3", "post-5"), name="gen.yaml", **more) -> Path:
    data = {"name": "toy-gen", "pool": [{"path": str(folder / c)} for c in pool], "tasks": tasks,
            "task_paths": [str(folder / "tasks")], "merge": {"dtype": "float32", "device": "cpu"}, **more}
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ADD = {"name": "add", "search": "toy_add_gen_dev", "holdout": "toy_add_gen_test", "metric": "exact_match"}


def lm_eval_scores(checkpoint: Path, tasks, **options):
    """lm-eval's own scores of a checkpoint folder (its HFLM, loaded from disk): the results and samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(checkpoint)}, tasks=list(tasks), batch_size=BATCH_SIZE, device="cpu",
        task_manager=TaskManager(include_path=[str(checkpoint.parent / "tasks")], include_defaults=False),
        bootstrap_iters=0, **options)


def resident(checkpoint: Path):
    """A model and tokenizer loaded as the search loads them, into which other weights are copied in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def load_weights(model, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(checkpoint / "model.safetensors"))


def assert_prompted_as_lm_eval(scorer: Scorer, scores, expected, name: str) -> None:
    """The scorer's requests for task `name` are those of lm-eval's run `expected`, and so is its score."""
    samples = sorted(expected["samples"][name], key=lambda sample: sample["doc_id"])
    assert requests_of(scorer, name) == [tuple(arguments) for sample in samples for arguments in sample["arguments"]]
    metric = "exact_match" if "gen" in name else "acc"
    assert scores[name][metric] == pytest.approx(expected["results"][name][f"{metric},none"])


def requests_of(scorer: Scorer, task: str):
    return [instance.args for instance in scorer.task_dict[task].instances]


def test_generative_tasks_leave_the_pool_as_built(small_pool, tmp_path):
    directory, _ = small_pool
    summary = demo_pool.read_summary(directory)
    copy = tmp_path / "pool"
    shutil.copytree(directory, copy)
    recipe = (copy / "recipe.yaml").read_text()
    tasks = demo_pool.write_generative_tasks(copy / "tasks")
    assert [t.search for t in tasks] == ["toy_add_gen_dev", "toy_sort_gen_dev", "toy_shift_gen_dev"]
    # The pool's content, its recipe and the files a complete pool holds are as they were built.
    assert content_fingerprint(copy, list(summary.checkpoints), summary.tasks) == summary.content_fingerprint
    assert (copy / "recipe.yaml").read_text() == recipe
    assert demo_pool.build_pool(copy, seed=0, size="small").content_fingerprint == summary.content_fingerprint


def test_trained_checkpoints_answer_the_generative_questions(gen_pool):
    # The generative twin asks the question as training did and expects the right choice's text.
    model, tokenizer = resident(gen_pool / "post-1")
    names = [task.search for task in demo_pool.generative_skill_tasks()]
    scorer = Scorer(model, tokenizer, names, [gen_pool / "tasks"], batch_size=BATCH_SIZE)
    question, settings = requests_of(scorer, "toy_add_gen_dev")[0]
    row = json.loads((gen_pool / "tasks" / "toy_add_dev.jsonl").read_text().splitlines()[0])
    assert question == row["question"] and settings["until"] == [" "] and settings["do_sample"] is False
    best = {name: 0.0 for name in names}
    for checkpoint in ("post-1", "post-3", "post-5"):
        load_weights(model, gen_pool / checkpoint)
        scores = scorer.score()
        best = {name: max(best[name], scores[name]["exact_match"]) for name in names}
    # Each skill has a checkpoint that answers most of its questions word for word.
    assert all(value > 0.5 for value in best.values()), best


def test_generative_task_through_optimize_scores_as_lm_eval_does(gen_pool, tmp_path):
    recipe = write_recipe(gen_pool, [ADD], pool=("post-1", "post-3"), search={"budget": 6})
    run_dir = tmp_path / "run"
    result = invoke("optimize", str(recipe), "--run-dir", str(run_dir), "--quiet", "--batch-size", str(BATCH_SIZE))
    assert result.exit_code == 0, result.output
    records = Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord)
    assert sum(r.kind == "proposal" for r in records) >= 1 and all(r.status == "ok" for r in records)
    holdout = [r for r in records if r.split == "holdout"]
    selection = [r for r in records if r.split == "selection"]
    assert holdout and selection
    for record in holdout + selection:
        values = record.documents["add"]
        assert set(values) <= {0, 1} and sum(values) / len(values) == pytest.approx(record.scores["add"])
    assert all(len(record.documents["add"]) == TEST_ROWS for record in holdout)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tasks"] == ["add"] and report["evaluations"] == 6
    # A checkpoint's holdout score is lm-eval's for that checkpoint, document by document.
    expected = lm_eval_scores(gen_pool / "post-3", ["toy_add_gen_test"])
    record = next(r for r in holdout if r.name == "post-3")
    assert record.scores["add"] == pytest.approx(expected["results"]["toy_add_gen_test"]["exact_match,none"])
    samples = sorted(expected["samples"]["toy_add_gen_test"], key=lambda sample: sample["doc_id"])
    assert record.documents["add"] == [sample["exact_match"] for sample in samples]
    assert 0 < record.scores["add"] < 1  # post-3 forgot part of `add`: the comparison is not all zeros or ones
    # The run resumes under a recipe that writes out the default, and is another run with few-shot prompts.
    for settings, code in (({"apply_chat_template": False}, 0), ({"num_fewshot": 1}, 2)):
        write_recipe(gen_pool, [{**ADD, **settings}], pool=("post-1", "post-3"), search={"budget": 6})
        again = invoke("optimize", str(recipe), "--run-dir", str(run_dir), "--quiet", "--batch-size", str(BATCH_SIZE))
        assert again.exit_code == code, again.output
    assert "holds a run of a different recipe (tasks changed)" in again.stderr
    assert len(Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord)) == len(records)


def test_generation_follows_the_weights_in_place_and_keeps_nothing_between_candidates(gen_pool):
    model, tokenizer = resident(gen_pool / "post-1")
    config = model.generation_config.to_dict()
    names = ["toy_add_gen_test", "toy_sort_gen_test"]
    scorer = Scorer(model, tokenizer, names, [gen_pool / "tasks"], batch_size=BATCH_SIZE)
    first = scorer.score(log_samples=True)
    load_weights(model, gen_pool / "post-3")
    other = scorer.score(log_samples=True)
    expected = lm_eval_scores(gen_pool / "post-3", names)
    for name in names:
        assert other[name]["exact_match"] == pytest.approx(expected["results"][name]["exact_match,none"])
        responses = sorted(expected["samples"][name], key=lambda sample: sample["doc_id"])
        task = scorer.task_dict[name]
        assert [instance.resps for instance in task.instances] == [sample["resps"][0] for sample in responses]
    assert other != first
    load_weights(model, gen_pool / "post-1")
    again = scorer.score(log_samples=True)
    assert dict(again) == dict(first) and again.samples == first.samples
    assert model.generation_config.to_dict() == config
    # What is kept between calls is the inputs, prepared once: one entry per set of requests.
    assert len(scorer.lm._generations) == 1


def test_num_fewshot_builds_lm_evals_prompts_and_scores(gen_pool):
    names = ["toy_add_gen_test", "toy_add_test"]
    model, tokenizer = resident(gen_pool / "post-1")
    plain = Scorer(model, tokenizer, names, [gen_pool / "tasks"], batch_size=BATCH_SIZE)
    shots = Scorer(model, tokenizer, names, [gen_pool / "tasks"], batch_size=BATCH_SIZE,
                   prompts={name: (2, False) for name in names})
    expected = lm_eval_scores(gen_pool / "post-1", names, num_fewshot=2)
    scores = shots.score(log_samples=True)
    for name in names:
        assert requests_of(plain, name) != requests_of(shots, name)
        assert_prompted_as_lm_eval(shots, scores, expected, name)
    context = requests_of(shots, "toy_add_gen_test")[0][0]
    assert context.count("=") == 3 and context.count(" ") == 2  # two solved examples, then the question
    # The search's copy of a task draws the same examples in every process (lm-eval's few-shot seed).
    again = Scorer(model, tokenizer, names, [gen_pool / "tasks"], batch_size=BATCH_SIZE,
                   prompts={name: (2, False) for name in names})
    assert requests_of(again, "toy_add_test") == requests_of(shots, "toy_add_test")


def with_chat_template(gen_pool: Path, folder: Path) -> Path:
    """A copy of post-1 whose tokenizer has CHAT_TEMPLATE, with the tasks beside it."""
    checkpoint = folder / "post-1"
    shutil.copytree(gen_pool / "post-1", checkpoint)
    shutil.copytree(gen_pool / "tasks", folder / "tasks")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return checkpoint


def test_apply_chat_template_prompts_as_lm_eval_does(gen_pool, tmp_path):
    checkpoint = with_chat_template(gen_pool, tmp_path)
    names = ["toy_add_gen_test", "toy_add_test"]
    model, tokenizer = resident(checkpoint)
    scorer = Scorer(model, tokenizer, names, [tmp_path / "tasks"], batch_size=BATCH_SIZE,
                    prompts={name: (1, True) for name in names})
    scores = scorer.score()
    expected = lm_eval_scores(checkpoint, names, num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True)
    for name in names:
        assert_prompted_as_lm_eval(scorer, scores, expected, name)
    context = requests_of(scorer, "toy_add_gen_test")[0][0]
    assert context.startswith("q: ") and context.count("q: ") == 2  # one example turn, then the question
    # Validation accepts it (the pool's tokenizer has a template), and describes it.
    shutil.copytree(gen_pool / "post-3", tmp_path / "post-3")
    recipe = write_recipe(tmp_path, [{**ADD, "num_fewshot": 1, "apply_chat_template": True}], pool=("post-1", "post-3"))
    result = invoke("validate", str(recipe))
    assert result.exit_code == 0, result.output
    assert "1-shot, chat template" in result.output


def test_apply_chat_template_without_a_template_is_one_line(gen_pool, tmp_path):
    recipe = write_recipe(gen_pool, [{**ADD, "apply_chat_template": True}], name="no-template.yaml")
    for command in ("validate", "optimize"):
        result = invoke(command, str(recipe), *(["--run-dir", str(tmp_path / "run")] if command == "optimize" else []))
        assert result.exit_code == 2, result.output
        error = lines(result.stderr)
        assert len(error) == 1 and "Traceback" not in result.output, result.output
        assert error[0].startswith(f"{recipe}: tasks[0].apply_chat_template: the pool's tokenizer ("), error
        assert "has no chat template" in error[0]
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "journal.jsonl").exists()
    # The check the search itself makes, for a pool whose tokenizer is known only once it is pulled.
    from mergekit_recycle.evaluate import check_chat_templates

    _, tokenizer = resident(gen_pool / "post-1")
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.apply_chat_template: the pool's tokenizer"):
        check_chat_templates(load_recipe(recipe), tokenizer, recipe)


def test_prompt_settings_that_cannot_work_are_one_line(gen_pool):
    cases = [
        ({"num_fewshot": DEV_ROWS}, "tasks[0].num_fewshot: lm-eval task 'toy_add_gen_dev' cannot give 40 few-shot "
                                    "examples: it draws them from 40 documents, one of which is the document asked"),
        ({"num_fewshot": -1}, "tasks[0].num_fewshot: input should be greater than or equal to 0"),
        ({"num_fewshot": True}, "tasks[0].num_fewshot: input should be a valid integer"),
        ({"num_fewshot": "2"}, "tasks[0].num_fewshot: input should be a valid integer"),
        ({"apply_chat_template": "yes"}, "tasks[0].apply_chat_template: input should be a valid boolean"),
    ]
    for settings, message in cases:
        recipe = write_recipe(gen_pool, [{**ADD, **settings}], name="bad.yaml")
        result = invoke("validate", str(recipe))
        assert result.exit_code == 2, (settings, result.output)
        error = lines(result.stderr)
        assert len(error) == 1 and error[0].startswith(f"{recipe}: {message}"), (settings, result.stderr)
    # One lm-eval task is prompted one way: two recipe tasks that score it must agree.
    other = {"name": "sum", "search": "toy_add_gen_dev", "holdout": "toy_sort_gen_test", "metric": "exact_match",
             "num_fewshot": 1}
    with pytest.raises(RecipeError, match=r"tasks\[1\]\.num_fewshot: lm-eval task 'toy_add_gen_dev' is scored by "
                                          r"tasks\[0\] too, with num_fewshot unset"):
        load_recipe(write_recipe(gen_pool, [ADD, other], name="bad.yaml"))


def test_a_generative_task_that_samples_or_cannot_fit_is_refused(gen_pool, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(gen_pool / "tasks", tasks)
    text = (tasks / "toy_add_gen_dev.yaml").read_text()
    (tasks / "toy_add_gen_dev.yaml").write_text(text.replace("do_sample: false", "do_sample: true"))
    recipe = write_recipe(gen_pool, [ADD], name="sampled.yaml", task_paths=[str(tasks)])
    result = invoke("validate", str(recipe))
    assert result.exit_code == 2, result.output
    assert "tasks[0].search: lm-eval task 'toy_add_gen_dev' samples its generations" in result.stderr
    # lm-eval's default of 256 new tokens leaves no room in the demo model's 64 positions.
    (tasks / "toy_add_gen_dev.yaml").write_text(text.replace("  max_gen_toks: 4\n", ""))
    model, tokenizer = resident(gen_pool / "post-1")
    with pytest.raises(TaskDefinitionError, match="generates up to 256 tokens .* in the model's 64"):
        Scorer(model, tokenizer, ["toy_add_gen_dev"], [tasks])


def tasks_digest(recipe_path: Path) -> str:
    recipe = load_recipe(recipe_path)
    return fingerprint(recipe, resolve_pool(recipe, recipe_path))["tasks"]


def test_fingerprint_unchanged_without_the_new_settings_and_changed_with_them(gen_pool):
    shift = {**ADD, "name": "shift", "search": "toy_shift_gen_dev", "holdout": "toy_shift_gen_test"}
    base = dict(name="toy-gen", pool=[{"path": "post-1"}, {"path": "post-3"}], task_paths=["tasks"])

    def digest(tasks) -> str:
        path = gen_pool / "fingerprint.yaml"
        path.write_text(yaml.safe_dump({**base, "tasks": tasks}))
        return tasks_digest(path)

    # The digest the code before num_fewshot and apply_chat_template gave this recipe: its runs resume.
    unset = digest([ADD, shift])
    assert unset == "8717c560e199dff6"
    assert digest([{**ADD, "apply_chat_template": False}, shift]) == unset  # the default, written out
    changed = {digest([{**ADD, "num_fewshot": 0}, shift]), digest([{**ADD, "num_fewshot": 2}, shift]),
               digest([{**ADD, "apply_chat_template": True}, shift])}
    assert len(changed) == 3 and unset not in changed
    # The same settings on the parsed recipe round-trip (validate --json's form parses back to the same recipe).
    recipe = parse_recipe({**base, "tasks": [{**ADD, "num_fewshot": 2, "apply_chat_template": True}]}, gen_pool)
    assert parse_recipe(recipe.model_dump(mode="json"), gen_pool) == recipe
