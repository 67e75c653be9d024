"""The forward work of a candidate: shared-prefix scoring against lm-eval's HFLM request by request,
vectorised multiple-choice metrics against lm-eval's process_results, and their fallbacks."""

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mergekit_recycle import demo_pool
from mergekit_recycle.architecture import SUPPORTED
from mergekit_recycle.evaluate import Scorer, quiet_lm_eval, resident_hflm

REQUESTS = [
    *(("12+34=", choice) for choice in ("46", "45", "4", "7")),  # shared context, one- and two-token continuations
    *(("sort cab=", choice) for choice in ("abc", "acb", "abc")),  # a repeated request
    ("", "hello"),  # an empty context: conditioned on the prefix token
    ("", "h"),
    *(("x" * 70, choice) for choice in ("abc", "abd", "zz")),  # longer than the model: truncated on the left
    ("key 3 usrzu=", "xvusx"),  # a context with a single continuation
]


def instances(pairs):
    return [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]


def assert_same_as_lm_eval(model, tokenizer, pairs, batch_size=4, **kwargs):
    """Our log-likelihoods equal HFLM's request by request; returns our prepared requests."""
    quiet_lm_eval()
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs).loglikelihood(instances(pairs))
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    lm.shared_prefix = True
    ours = lm.loglikelihood(instances(pairs))
    for pair, (ll, greedy), (their_ll, their_greedy) in zip(pairs, ours, expected):
        assert abs(ll - their_ll) <= 1e-4, pair
        assert greedy == their_greedy, pair
    (prepared,) = lm._prepared.values()
    return prepared


@pytest.mark.parametrize("model_type", sorted(architecture.model_type for architecture in SUPPORTED.values()))
def test_shared_prefix_log_likelihoods_equal_lm_eval_on_every_supported_architecture(model_type):
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_causal_lm(tokenizer, seed=1, model_type=model_type).eval()  # 64 positions: truncation
    prepared = assert_same_as_lm_eval(model, tokenizer, REQUESTS)
    statistics = prepared.statistics()
    assert prepared.note is None and statistics["shared_prefix"]
    assert statistics["rows"] == 6  # one per distinct context (the empty one: the prefix token)


def test_many_contexts_across_batches_give_lm_eval_s_values():
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=4).eval()
    pairs = [(f"q{i} " + "ab" * (i % 7), f" {choice}") for i in range(40) for choice in ("yes", "no", "maybe")]
    # 40 contexts of 3 continuations each: each context runs once instead of three times.
    assert assert_same_as_lm_eval(model, tokenizer, pairs, batch_size=16).statistics()["rows"] == 40
    assert assert_same_as_lm_eval(model, tokenizer, pairs, batch_size=1).statistics()["batches"] == 40


def test_one_token_continuations_need_no_tokens_of_their_own():
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=0).eval()
    pairs = [(f"{a}+{b}=", str(digit)) for a, b in ((1, 2), (3, 4)) for digit in range(10)]
    prepared = assert_same_as_lm_eval(model, tokenizer, pairs)
    statistics = prepared.statistics()
    assert statistics["rows"] == 2 and statistics["tokens"] == 2 * (1 + len("1+2="))  # each context once, after its BOS


class _Ignores(torch.nn.Module):
    """A causal LM that ignores some of the arguments it is given (as some remote-code models do)."""

    def __init__(self, model, *ignored: str):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.ignored = ignored

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids, **{key: value for key, value in kwargs.items() if key not in self.ignored})


def test_a_model_that_ignores_the_block_mask_is_scored_unpacked_and_says_so():
    from mergekit_recycle.loglikelihoods import PreparedLoglikelihoods

    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=2).eval()
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4)
    encoded = [lm._encoded(*pair) for pair in REQUESTS]
    expected = PreparedLoglikelihoods(encoded, lm.max_length, 4, "cpu", shared_prefix=False).score(model)
    prepared = PreparedLoglikelihoods(encoded, lm.max_length, 4, "cpu", shared_prefix=True)
    assert prepared.score(_Ignores(model, "attention_mask", "position_ids")) == expected
    assert prepared.note.startswith("shared-prefix scoring is off for this run: with _Ignores log-likelihoods "
                                    "differ from one row per request by up to ")
    assert "(tolerance 0.0001 in float32)" in prepared.note
    assert prepared.statistics()["shared_prefix"] is False
    assert prepared.score(_Ignores(model, "attention_mask", "position_ids")) == expected  # and stays unpacked


def test_a_model_that_ignores_logits_to_keep_still_gives_lm_eval_s_values():
    from mergekit_recycle.loglikelihoods import PreparedLoglikelihoods

    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=5).eval()
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4)
    encoded = [lm._encoded(*pair) for pair in REQUESTS]
    expected = PreparedLoglikelihoods(encoded, lm.max_length, 4, "cpu").score(model)
    prepared = PreparedLoglikelihoods(encoded, lm.max_length, 4, "cpu")
    assert prepared.score(_Ignores(model, "logits_to_keep")) == expected and prepared.note is None


def test_packed_rows_longer_than_the_model_keep_every_position_in_its_table():
    """GPT-2's absolute positions: a packed row may be longer than the model, its padding is not."""
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_causal_lm(tokenizer, seed=6, model_type="gpt2").eval()  # 64 positions
    pairs = [("q" * 40, " " + c * 12) for c in "abcd"] + [("short", " x"), ("short", " yz")]
    prepared = assert_same_as_lm_eval(model, tokenizer, pairs, batch_size=8)
    assert prepared.note is None and prepared.statistics()["shared_prefix"]
    assert max(row.length for row in prepared.rows) > 64


def test_a_sliding_window_shorter_than_a_request_scores_it_unpacked():
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_causal_lm(tokenizer, seed=7, model_type="mistral").eval()
    model.config.sliding_window = 8  # transformers applies it when it builds the mask itself
    prepared = assert_same_as_lm_eval(model, tokenizer, REQUESTS)
    assert prepared.statistics()["shared_prefix"] is False


def test_an_empty_continuation_has_log_likelihood_0_and_moves_nothing_else():
    from mergekit_recycle.loglikelihoods import PreparedLoglikelihoods

    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=8).eval()
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4)
    encoded = [lm._encoded(*pair) for pair in REQUESTS]
    empty = (("12+34=", ""), lm._encoded("12+34=", "4")[1], [])
    ours = PreparedLoglikelihoods(encoded[:3] + [empty] + encoded[3:], lm.max_length, 4, "cpu").score(model)
    assert ours[3] == (0.0, True)
    assert ours[:3] + ours[4:] == PreparedLoglikelihoods(encoded, lm.max_length, 4, "cpu").score(model)


def test_half_precision_keeps_shared_prefixes_within_its_rounding():
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=9).eval().to(torch.bfloat16)
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4)
    lm.loglikelihood(instances(REQUESTS))
    (prepared,) = lm._prepared.values()
    assert prepared.note is None and prepared.statistics()["shared_prefix"]


def test_batch_size_auto_measures_the_cpu_plateau_and_a_bad_value_is_refused(small_pool):
    from conftest import invoke
    from mergekit_recycle.loglikelihoods import AUTO_BATCH_SIZES, choose_batch_size

    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=10).eval()
    lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=4)
    encoded = [lm._encoded(f"{i}+{i}=", choice) for i in range(40) for choice in ("12", "3", "45")]
    size, reason = choose_batch_size(model, encoded, lm.max_length, "cpu")
    assert size in AUTO_BATCH_SIZES and reason.startswith("the throughput plateau, timed on batches of 4, 8")
    assert choose_batch_size(model, [], lm.max_length, "cpu")[0] == 64
    recipe = str(small_pool[0] / "recipe.yaml")
    for bad in ("0", "x", "-3"):
        result = invoke("optimize", recipe, "--batch-size", bad)
        assert result.exit_code == 2 and f"{bad!r} is not a batch size: a positive number of rows, or auto" in result.output


def write_task(folder: Path, name: str, rows, metrics=("acc", "acc_norm"), extra: str = "") -> None:
    """A multiple-choice lm-eval task over a JSONL file in `folder`."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        f"doc_to_target: answer\n{extra}metric_list:\n{metric_list}metadata:\n  version: 1.0\n")


@pytest.fixture(scope="module")
def metric_tasks(tmp_path_factory):
    """Tasks whose documents exercise every way process_results reads a gold answer."""
    folder = tmp_path_factory.mktemp("metric-tasks")
    rows = []
    for i in range(60):
        choices = ["a" * (1 + i % 3), "bb", "c" * (1 + i % 5), "dddd"][: 2 + i % 3]
        answer = [i % len(choices), choices[i % len(choices)], 7, [0, 1], -1][i % 5]  # index, text, out of range, list
        rows.append({"question": f"item {i} is", "choices": choices, "answer": answer})
    single = [dict(row, answer=row["answer"] if not isinstance(row["answer"], list) else 1) for row in rows]
    write_task(folder, "mc_golds", single)
    write_task(folder, "mc_text_golds", [dict(row, answer=row["choices"][0]) for row in rows])
    write_task(folder, "mc_many_golds", [dict(row, answer=[0, len(row["choices"]) - 1]) for row in rows])
    write_task(folder, "mc_mutual_info", single[:10], metrics=("acc", "acc_mutual_info"))
    return folder


TASKS = ["mc_golds", "mc_text_golds", "mc_many_golds", "mc_mutual_info"]


def scores_both_ways(monkeypatch, folder, log_samples=True):
    tokenizer = demo_pool.char_tokenizer()
    model = demo_pool.tiny_llama(tokenizer, seed=3).eval()
    results = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("MERGEKIT_RECYCLE_VECTOR_METRICS", fast)
        scorer = Scorer(model, tokenizer, TASKS, [folder], batch_size=8)
        scores = scorer.score(log_samples=log_samples)
        results[fast] = (scorer, dict(scores), scores.samples)
    return results


def test_vectorised_metrics_equal_lm_eval_s_process_results(monkeypatch, metric_tasks):
    results = scores_both_ways(monkeypatch, metric_tasks)
    scorer, scores, samples = results["1"]
    assert sorted(scorer.vectorised) == ["mc_golds", "mc_many_golds", "mc_text_golds"]  # mutual info: lm-eval's
    assert scores == results["0"][1] and samples == results["0"][2]
    assert set(scores["mc_golds"]) == {"acc", "acc_norm"} and len(samples["mc_golds"]["acc_norm"]) == 60
    assert 0 < scores["mc_many_golds"]["acc"] < 1
    assert scorer.notes == [] and scorer.checks_left == 2
    assert dict(scorer.score(log_samples=False)) == scores and scorer.score().samples == {}


def test_a_vectorised_metric_that_differs_from_lm_eval_hands_the_run_back_to_lm_eval(monkeypatch, metric_tasks):
    from mergekit_recycle import metrics

    expected = scores_both_ways(monkeypatch, metric_tasks)["0"]
    honest = metrics.table_scores

    def off_by_one(table, loglikelihoods):
        values = honest(table, loglikelihoods)
        values["acc"][0] = 1 - values["acc"][0]
        return values

    monkeypatch.setattr(metrics, "table_scores", off_by_one)
    monkeypatch.setenv("MERGEKIT_RECYCLE_VECTOR_METRICS", "1")
    tokenizer = demo_pool.char_tokenizer()
    scorer = Scorer(demo_pool.tiny_llama(tokenizer, seed=3).eval(), tokenizer, TASKS, [metric_tasks], batch_size=8)
    scores = scorer.score(log_samples=True)
    assert (dict(scores), scores.samples) == expected[1:]
    assert scorer.vectorised == {}
    (note,) = scorer.notes
    assert note.startswith("vectorised metrics differ from lm-eval's (mc_golds document 0: acc is ")
    assert note.endswith("lm-eval computes them for the rest of the run")
