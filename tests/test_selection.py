"""The winner's selection rule and the report's holdout comparison, on synthetic score tables."""

import numpy as np
import pytest

from mergekit_recycle.records import EvaluationRecord, FinishRecord, RunRecord, SelectionRecord, SessionRecord
from mergekit_recycle.report import build_report, claim, margins_line
from mergekit_recycle.selection import Contender, choose, interval, paired_bootstrap

SHARES = {"a": 0.5, "b": 0.5}
DOCUMENTS = 300


def documents(rng, accuracy, count=DOCUMENTS):
    """Per-document 0/1 scores of a model with this accuracy on tasks a and b."""
    return {task: (rng.random(count) < accuracy).astype(float).tolist() for task in SHARES}


def correlated(rng, base, flip):
    """A model that answers like `base` except on a share `flip` of documents, which it gets right."""
    return {task: [1.0 if rng.random() < flip else value for value in values] for task, values in base.items()}


def contender(name, kind, docs, search=None):
    objective = sum(share * float(np.mean(docs[task])) for task, share in SHARES.items())
    return Contender(name, kind, objective if search is None else search, objective, docs)


def test_paired_bootstrap_resamples_documents_within_each_task():
    mine = {"a": [1.0, 1.0, 0.0, 1.0], "b": [1.0, 0.0]}
    assert np.all(paired_bootstrap(mine, mine, SHARES) == 0)
    shifted = {"a": [1.0] * 4, "b": [1.0, 1.0]}
    draws = paired_bootstrap(shifted, mine, SHARES)
    assert draws.shape == (2000,) and draws.min() >= 0 and np.mean(draws) == pytest.approx(0.5 * 0.25 + 0.5 * 0.5, abs=0.03)
    assert paired_bootstrap(mine, {"a": [1.0]}, SHARES) is None  # nothing to pair
    # The same draws every time: a report rebuilt from the journal says the same.
    assert np.array_equal(paired_bootstrap(shifted, mine, SHARES), draws)


def test_noise_only_rarely_replaces_the_baseline_and_never_by_much():
    switches = {0.0: 0, 0.95: 0}
    for seed in range(60):
        rng = np.random.default_rng(seed)
        base = documents(rng, 0.7)
        # Baselines and finalists alike are the same model up to noise in which documents they get right.
        pool = [contender(f"ckpt-{i}", "checkpoint", correlated(rng, base, 0.05)) for i in range(3)]
        finalists = [contender(f"proposal {i}", "proposal", correlated(rng, base, 0.05)) for i in range(5)]
        for confidence in switches:
            decision = choose(pool, finalists, SHARES, holdback=0.3, confidence=confidence)
            if decision.winner != decision.reference:
                switches[confidence] += 1
                assert decision.lower > 0 and decision.margin > 0
    # Bonferroni over 5 finalists bounds a false switch by 1 - confidence (5% at 0.95); at the default 0
    # the bound is only a correction for picking the best of 5, and a switch between equals costs nothing.
    assert switches[0.95] <= 3 and switches[0.0] <= 20


def test_a_real_gain_wins_and_the_reason_says_by_how_much():
    rng = np.random.default_rng(1)
    base = documents(rng, 0.6)
    pool = [contender("ckpt-a", "checkpoint", base), contender("greedy soup", "greedy", correlated(rng, base, 0.02))]
    finalists = [contender("proposal 7", "proposal", correlated(rng, base, 0.03)),
                 contender("proposal 9", "proposal", correlated(rng, base, 0.25))]
    decision = choose(pool, finalists, SHARES, holdback=0.3, confidence=0.95)
    assert decision.winner == "proposal 9" and decision.kind == "proposal" and decision.challenger == "proposal 9"
    assert decision.lower > 0.05 and decision.level == pytest.approx(0.025)
    assert "proposal 9 wins" in decision.reason and "corrected for 2 finalists" in decision.reason


def test_a_lucky_search_score_does_not_win_without_a_held_back_win():
    rng = np.random.default_rng(2)
    base = documents(rng, 0.7)
    pool = [contender("ckpt-a", "checkpoint", base)]
    # Best on the search tasks by far (the winner's curse), no better on the held-back documents.
    lucky = contender("proposal 3", "proposal", correlated(rng, base, 0.0), search=0.95)
    decision = choose(pool, [lucky], SHARES, holdback=0.3, confidence=0.5)
    assert decision.winner == "ckpt-a" and decision.kind == "checkpoint"
    assert "not a clear win, so ckpt-a, the best baseline on the dev documents, is kept" in decision.reason


def test_a_tie_on_dev_takes_the_better_held_back_score_then_the_earlier_baseline():
    rng = np.random.default_rng(3)
    base = documents(rng, 0.7)
    better = correlated(rng, base, 0.1)
    first, second = contender("ckpt-a", "checkpoint", base), contender("ckpt-b", "checkpoint", better)
    # Equal on all dev documents: the held-back documents break the tie.
    tied = [Contender("ckpt-a", "checkpoint", 0.8, 0.7, base), Contender("ckpt-b", "checkpoint", 0.8, 0.7, better)]
    assert choose(tied, [], SHARES, 0.3, 0.5).reference == "ckpt-a"
    assert choose([first, second], [], SHARES, 0.3, 0.5).winner == "ckpt-b"


def evaluation(kind, name, split, weights, docs, **extra):
    scores = {task: float(np.mean(values)) for task, values in docs.items()}
    return EvaluationRecord(split=split, kind=kind, name=name, weights=weights, scale=1.0,
                            key=[round(weights[n], 9) for n in sorted(weights)] + [1.0], status="ok", scores=scores,
                            objective=sum(SHARES[t] * v for t, v in scores.items()), merge_seconds=0.0,
                            eval_seconds=0.0, documents=docs, **extra)


def test_the_report_compares_with_the_checkpoint_best_on_holdout_and_says_no_better_when_the_interval_holds_0():
    rng = np.random.default_rng(4)
    names = ["ckpt-a", "ckpt-b"]
    one = {"ckpt-a": 1.0, "ckpt-b": 0.0}
    two = {"ckpt-a": 0.0, "ckpt-b": 1.0}
    half = {"ckpt-a": 0.5, "ckpt-b": 0.5}
    dev = documents(rng, 0.7)
    holdout_a = documents(rng, 0.6, 1000)
    holdout_b = correlated(rng, holdout_a, 0.2)  # ckpt-b is far better on holdout, though tied with ckpt-a on dev
    holdout_merge = correlated(rng, holdout_a, 0.19)  # the merge: above ckpt-a, about level with ckpt-b
    records = [RunRecord(recipe="toy", tasks=[
        {"name": t, "search": f"{t}_dev", "holdout": f"{t}_test", "metric": "acc", "weight": 1.0} for t in SHARES],
        checkpoints=[{"name": n, "source": n} for n in names]),
        SessionRecord(started="2025-01-01T00:00:00+00:00", budget=1, seed=0)]
    for name, weights in (("ckpt-a", one), ("ckpt-b", two)):
        records.append(evaluation("checkpoint", name, "search", weights, dev))
    records.append(evaluation("uniform", "uniform soup", "search", half, dev))
    records.append(evaluation("greedy", "greedy soup", "search", one, dev))
    records += [evaluation("checkpoint", "ckpt-a", "holdout", one, holdout_a),
                evaluation("checkpoint", "ckpt-b", "holdout", two, holdout_b),
                evaluation("uniform", "uniform soup", "holdout", half, holdout_merge),
                evaluation("greedy", "greedy soup", "holdout", one, holdout_a)]
    records.append(SelectionRecord(winner="uniform soup", kind="uniform", reference="uniform soup", reason="kept",
                                   holdback=0.3, confidence=0.5, weights=half, key=[0.5, 0.5, 1.0]))
    records.append(evaluation("optimized", "uniform soup", "holdout", half, holdout_merge, reused="uniform soup"))
    records.append(FinishRecord())
    report = build_report(records)
    comparison = report["comparison"]
    assert comparison["best_checkpoint"] == "ckpt-b" and comparison["beaten"] == 1
    best = comparison["margins"]["best checkpoint"]
    assert best["name"] == "ckpt-b" and best["low"] < 0 < best["high"] and best["verdict"] == "no different"
    assert comparison["margins"]["greedy soup"]["verdict"] == "better"
    line = margins_line(report)
    assert "no better than ckpt-b, the best checkpoint on holdout" in line and "better than greedy soup" in line
    assert "beats 1 of the 2 checkpoints" in line and "a baseline kept by the selection" in line
    # Without per-document scores (journals from before they were kept) no interval is claimed.
    assert "no interval" in claim("uniform soup", {"name": "uniform soup", "margin": 0.01, "low": None, "high": None})
    assert interval({}, {}, SHARES, 0.02).low is None
