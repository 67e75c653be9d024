"""Scorer: lm-eval scores of a resident model, with requests and tokens built once."""

import pytest

from mergekit_recycle.evaluate import Scorer, quiet_lm_eval

TASKS = ["toy_add_dev", "toy_sort_dev", "toy_shift_dev"]


@pytest.fixture(scope="module")
def model_and_tokenizer(small_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = small_pool
    return (AutoModelForCausalLM.from_pretrained(directory / "post-1").eval(),
            AutoTokenizer.from_pretrained(directory / "post-1"))


def plain_lm_eval(model, tokenizer, directory, samples):
    """lm-eval's own evaluate, with the tasks built afresh: what Scorer must agree with."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    quiet_lm_eval()
    tasks = get_task_dict(TASKS, TaskManager(include_path=str(directory / "tasks"), include_defaults=False))
    results = lm_eval.evaluator.evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64), tasks,
                                         samples=samples or None, bootstrap_iters=0, verbosity="ERROR")
    per_document = {task: [sample["acc"] for sample in results["samples"][task]] for task in TASKS}
    return {task: results["results"][task]["acc,none"] for task in TASKS}, per_document


def test_scores_equal_lm_eval_and_stay_equal_as_weights_change(small_pool, model_and_tokenizer):
    import torch

    directory, _ = small_pool
    model, tokenizer = model_and_tokenizer
    scorer = Scorer(model, tokenizer, TASKS, [directory / "tasks"], limits={"toy_add_dev": 40}, seed=3)
    original = {name: p.clone() for name, p in model.state_dict().items()}
    try:
        for step in range(2):
            scores = scorer.score(log_samples=True)
            ours = {task: metrics["acc"] for task, metrics in scores.items()}
            theirs, per_document = plain_lm_eval(model, tokenizer, directory, scorer.samples)
            assert ours == theirs
            assert {task: scores.samples[task]["acc"] for task in TASKS} == per_document
            with torch.no_grad():  # new weights in place: the same requests must see them
                for parameter in model.parameters():
                    parameter.mul_(0.9)
    finally:
        model.load_state_dict(original)


def test_a_limit_is_one_seeded_subset(small_pool, model_and_tokenizer):
    directory, _ = small_pool
    model, tokenizer = model_and_tokenizer

    def subset(seed, limit=30):
        return Scorer(model, tokenizer, TASKS, [directory / "tasks"], limits={"toy_sort_dev": limit}, seed=seed).samples

    first = subset(1)
    assert list(first) == ["toy_sort_dev"] and len(first["toy_sort_dev"]) == 30
    assert first == subset(1) and first != subset(2)
    assert first["toy_sort_dev"] != list(range(30))  # a random subset, not the first documents
    assert subset(1, limit=10_000) == {}  # a limit above the task's size keeps every document
    scores = Scorer(model, tokenizer, TASKS, [directory / "tasks"], limits={"toy_sort_dev": 30}, seed=1).score(log_samples=True)
    assert len(scores.samples["toy_sort_dev"]["acc"]) == 30 and len(scores.samples["toy_add_dev"]["acc"]) == 100


def test_log_likelihoods_equal_hflm_with_a_padded_vocabulary_empty_contexts_and_truncation(small_pool):
    """The prepared batches must give what lm-eval's own HFLM gives, request by request."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_recycle.evaluate import resident_hflm

    directory, _ = small_pool
    tokenizer = AutoTokenizer.from_pretrained(directory / "post-2")
    model = AutoModelForCausalLM.from_pretrained(directory / "post-2").eval()
    model.resize_token_embeddings(model.config.vocab_size + 20)  # rows the tokenizer never produces
    long_context = "12+34=46\n" * 40  # longer than the model's positions: truncated on the left
    requests = [("12+34=", "46"), ("12+34=", "47"), ("", "sort cab=abc"), ("shift qrs 2=", "stu"),
                (long_context, "5"), ("sort ba=", "ab")]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(requests)]
    ours = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64).loglikelihood(instances)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64).loglikelihood(instances)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    assert [value for value, _ in ours] == pytest.approx([value for value, _ in theirs], abs=1e-4)


def test_a_holdback_splits_each_task_in_two_disjoint_seeded_parts(small_pool, model_and_tokenizer):
    directory, _ = small_pool
    model, tokenizer = model_and_tokenizer

    def part(name, seed=1, limits=None, holdback=0.3):
        return Scorer(model, tokenizer, TASKS, [directory / "tasks"], limits=limits, seed=seed, holdback=holdback,
                      part=name).samples

    search, selection = part("search"), part("selection")
    for task in TASKS:  # 100 dev documents each: 30 held back, 70 searched, none in both
        assert len(selection[task]) == 30 and len(search[task]) == 70
        assert sorted(selection[task] + search[task]) == list(range(100))
    assert selection == part("selection") and selection != part("selection", seed=2)
    # A limit draws from the searched part only; without a holdback the subsets are the earlier versions'.
    limited = part("search", limits={"toy_sort_dev": 20})
    assert len(limited["toy_sort_dev"]) == 20 and set(limited["toy_sort_dev"]) <= set(search["toy_sort_dev"])
    assert part("search", limits={"toy_sort_dev": 30}, holdback=0.0) == \
        Scorer(model, tokenizer, TASKS, [directory / "tasks"], limits={"toy_sort_dev": 30}, seed=1).samples
    scores = Scorer(model, tokenizer, TASKS, [directory / "tasks"], seed=1, holdback=0.3,
                    part="selection").score(log_samples=True)
    assert [len(scores.samples[task]["acc"]) for task in TASKS] == [30, 30, 30]
