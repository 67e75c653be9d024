"""`mergekit-recycle optimize` on the small demo pool: the search, its journal, resume, failures, the report."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import lines, run_cli
from mergekit_recycle.candidate import ResidentEvaluator
from mergekit_recycle.errors import PoolError, SearchAbortedError
from mergekit_recycle.journal import Journal
from mergekit_recycle.records import EvaluationRecord, SessionRecord
from mergekit_recycle.mergekit_yaml import write_merge_config
from mergekit_recycle.optimize import RunOptions, optimize
from mergekit_recycle.pool import resolve_pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import load_recipe, parse_recipe
from mergekit_recycle.resident_merge import ResidentMerger, load_resident_model

BUDGET = 10
KINDS = {"checkpoint", "uniform", "greedy", "optimized"}


def optimize_cli(recipe: Path, run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_cli("optimize", str(recipe), "--run-dir", str(run_dir), "--quiet", *flags)


def evaluations(run_dir: Path, kind: str = "proposal"):
    return [r for r in Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord) if r.kind == kind]


def evaluated(run_dir: Path):
    return [r for r in evaluations(run_dir) if r.reused is None]


@pytest.fixture(scope="module")
def recipe_file(small_pool) -> Path:
    return small_pool[0] / "recipe.yaml"


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory):
    """One uninterrupted run through the CLI: (run folder, the CLI's result)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    result = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
    assert result.returncode == 0, result.stderr
    return run_dir, result


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def test_report_has_the_promised_shape_and_the_winner_beats_every_baseline_on_search(reference, small_pool):
    run_dir, result = reference
    report = json.loads((run_dir / "report.json").read_text())
    names = [f"post-{i}" for i in range(1, 7)]
    assert report["evaluations"] == BUDGET and report["tasks"] == ["add", "sort", "shift"]
    assert [row["kind"] for row in report["rows"]] == ["checkpoint"] * 6 + ["uniform", "greedy", "optimized"]
    for row in report["rows"]:
        assert set(row) >= {"name", "kind", "weights", "search", "holdout"} and row["kind"] in KINDS
        assert list(row["weights"]) == names and sum(row["weights"].values()) == pytest.approx(1.0)
        for split in ("search", "holdout"):
            assert set(row[split]) == {"add", "sort", "shift", "objective"}
            assert row[split]["objective"] == pytest.approx(sum(row[split][t] for t in report["tasks"]) / 3)
    optimized = report["rows"][-1]
    baselines = report["rows"][:-1]
    # The winner is the selection's choice, scored on the held-back documents with every baseline.
    selection = report["selection"]
    assert selection["winner"] == report["winner"]["from"] and selection["holdback"] == 0.3
    assert selection["reason"] and selection["reference"] in {row["name"] for row in baselines}
    assert all(row["selection"]["objective"] is not None for row in report["rows"])
    best_dev = max(baselines, key=lambda r: 0.7 * r["search"]["objective"] + 0.3 * r["selection"]["objective"])
    assert selection["reference"] == best_dev["name"]
    if selection["winner"] != selection["reference"]:
        assert selection["lower"] > 0 and optimized["selection"]["objective"] > best_dev["selection"]["objective"]
    # The report compares with the checkpoint best on holdout, and counts the checkpoints the winner beats.
    singles = [row for row in baselines if row["kind"] == "checkpoint"]
    comparison = report["comparison"]
    assert comparison["best_checkpoint"] == max(singles, key=lambda r: r["holdout"]["objective"])["name"]
    assert comparison["beaten"] == sum(optimized["holdout"]["objective"] > r["holdout"]["objective"] for r in singles)
    for entry in comparison["margins"].values():
        assert entry["low"] <= entry["margin"] <= entry["high"]
    # The CLI ends with the holdout table, the comparison and the selection's reason.
    assert "| optimized | optimized |" in result.stdout
    assert f"the best checkpoint on holdout: " in result.stdout and "Selection: " in result.stdout
    assert result.stderr == ""  # --quiet


def test_run_folder_holds_journal_proposals_report_plots_and_a_loadable_merge(reference):
    from transformers import AutoModelForCausalLM

    from mergekit_recycle.merge import load_merge_config

    run_dir, _ = reference
    # Journaled as each result arrives (a reuse after the generation's evaluations): in any order, every id once.
    proposals = sorted(evaluations(run_dir), key=lambda record: record.id)
    assert [r.id for r in proposals] == list(range(len(proposals)))
    assert sorted(p.name for p in (run_dir / "proposals").iterdir()) == [f"{r.id:06d}.yaml" for r in proposals]
    for record in proposals:
        assert set(record.to_json()) >= {"id", "generation", "coordinates", "weights", "scores", "objective", "status",
                                         "merge_seconds", "eval_seconds"}
        config, _ = load_merge_config(run_dir / "proposals" / f"{record.id:06d}.yaml")
        assert config.merge_method == "recycle_linear"
        weights = {Path(str(m.model.model.path)).name: m.parameters["weight"] for m in config.models}
        assert weights == pytest.approx(record.weights)
    assert any(r.reused for r in proposals)  # the injected soups were not evaluated again
    report_md = (run_dir / "report.md").read_text()
    assert "Pareto front" in report_md and "weights exceed 1%" in report_md and "| optimized |" in report_md
    for plot in ("progress.png", "tasks.png", "weights.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "merged" / "mergekit_config.yml").is_file()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert model.config.model_type == "llama"


def test_report_command_prints_both_splits(reference):
    run_dir, _ = reference
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "search objective" in result.stdout and "holdout objective" in result.stdout
    assert json.loads(run_cli("report", str(run_dir), "--json").stdout)["evaluations"] == BUDGET
    missing = run_cli("report", str(run_dir / "nope"))
    assert missing.returncode == 2 and len(lines(missing.stderr)) == 1 and "journal.jsonl" in missing.stderr


def merged_by_cli(config: Path, out: Path) -> dict:
    result = run_cli("merge", str(config), str(out))
    assert result.returncode == 0, result.stderr
    return load_file(out / "model.safetensors")


def assert_resident_equals(model, expected: dict) -> None:
    state = model.state_dict()
    for name, tensor in expected.items():
        assert (state[name] - tensor).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_resident_merge_equals_merging_the_proposal_yaml(reference, recipe_file, tmp_path, in_memory):
    run_dir, _ = reference
    recipe = load_recipe(recipe_file)
    pool = resolve_pool(recipe, recipe_file)
    model, _ = load_resident_model(pool, "float32", "cpu")
    merger = ResidentMerger(pool, model, "float32", in_memory=in_memory)
    for record in [evaluated(run_dir)[-1], evaluated(run_dir)[0]]:
        merger.merge(Merge(weights=record.weights, scale=record.scale))
        expected = merged_by_cli(run_dir / "proposals" / f"{record.id:06d}.yaml", tmp_path / str(record.id))
        assert_resident_equals(model, expected)


def test_resident_merge_with_an_anchor_and_a_scale_equals_mergekit(small_pool, tmp_path):
    directory, _ = small_pool
    pool = resolve_pool(anchored_recipe(small_pool), directory / "recipe.yaml")
    model, _ = load_resident_model(pool, "float32", "cpu")
    merge = Merge(weights={name: float(i) for i, name in enumerate(pool.names)}, scale=1.37)  # post-1 gets 0
    ResidentMerger(pool, model, "float32", in_memory=False).merge(merge)
    config = write_merge_config(tmp_path / "anchored.yaml", merge, pool, "float32", "test")
    assert_resident_equals(model, merged_by_cli(config, tmp_path / "out"))


def launch(recipe_file: Path, run_dir: Path) -> subprocess.Popen:
    script = Path(sys.executable).parent / "mergekit-recycle"
    return subprocess.Popen([str(script), "optimize", str(recipe_file), "--run-dir", str(run_dir), "--quiet",
                             "--budget", str(BUDGET)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_killed_run_resumes_to_the_same_result(reference, recipe_file, tmp_path):
    run_dir = tmp_path / "killed"
    process = launch(recipe_file, run_dir)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "journal.jsonl").exists() and len(evaluated(run_dir)) >= 4:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len(evaluated(run_dir))
    assert 4 <= killed_at < BUDGET and not (run_dir / "report.json").exists()

    running = run_cli("report", str(run_dir))  # a run that stopped half-way still has a report
    assert running.returncode == 0, running.stderr

    result = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
    assert result.returncode == 0, result.stderr
    proposals = evaluations(run_dir)
    assert len(evaluated(run_dir)) == BUDGET
    assert len({r.id for r in proposals}) == len(proposals)
    mine = json.loads((run_dir / "report.json").read_text())["rows"][-1]
    theirs = json.loads((reference[0] / "report.json").read_text())["rows"][-1]
    assert mine == theirs
    # The same finalists, the same decision, for the same reason.
    assert json.loads((run_dir / "report.json").read_text())["selection"] == \
        json.loads((reference[0] / "report.json").read_text())["selection"]
    baselines = [r for r in Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord) if r.kind == "checkpoint"]
    assert len(baselines) == 3 * 6  # each checkpoint scored once on each split, never again after the kill


def test_rerunning_a_finished_run_evaluates_nothing_and_a_larger_budget_continues(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    before = Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord)
    again = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
    assert again.returncode == 0, again.stderr
    assert Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord) == before  # only a session and a finish line more
    # --batch-size auto chose once, and the session that resumed on the same machine kept the choice.
    first, second = Journal(run_dir / "journal.jsonl").of_type(SessionRecord)
    assert isinstance(first.batch_size, int) and " CPU, " in first.batch_size_device
    assert (second.batch_size, second.batch_size_device) == (first.batch_size, first.batch_size_device)
    more = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET + 3))
    assert more.returncode == 0, more.stderr
    assert len(evaluated(run_dir)) == BUDGET + 3
    assert json.loads((run_dir / "report.json").read_text())["evaluations"] == BUDGET + 3


def rewrite(path: Path, change) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(record)) + "\n" for record in records))


def test_a_budget_of_plus_n_adds_n_and_the_replay_tolerates_the_last_bits(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    assert json.loads((run_dir / "search.json").read_text())["generation"] >= 1
    # Another CPU's BLAS may round the replayed proposals differently in their last bits: the run goes on.
    rewrite(run_dir / "journal.jsonl", lambda r: {**r, "coordinates": [c * (1 + 1e-12) for c in r["coordinates"]]}
            if "coordinates" in r else r)
    more = optimize_cli(recipe_file, run_dir, "--budget", "+3")
    assert more.returncode == 0, more.stderr
    assert len(evaluated(run_dir)) == BUDGET + 3
    bad = optimize_cli(recipe_file, run_dir, "--budget", "+x")
    assert bad.returncode == 2 and "'+x' is not a budget" in bad.stderr


def test_a_replay_that_misses_the_recorded_cma_state_is_refused(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    state = json.loads((run_dir / "search.json").read_text())
    (run_dir / "search.json").write_text(json.dumps({**state, "sigma": state["sigma"] * 1.5, "cma": "3.0.0"}))
    before = len(evaluated(run_dir))
    again = optimize_cli(recipe_file, run_dir, "--budget", "+3")
    assert again.returncode == 2 and len(lines(again.stderr)) == 1, again.stderr
    assert "search.json: replaying the journal reaches another CMA-ES state at generation" in again.stderr
    assert "install cma==3.0.0, or rerun with --restart" in again.stderr
    assert len(evaluated(run_dir)) == before


def test_a_torn_last_journal_line_is_cut_off(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    journal = run_dir / "journal.jsonl"
    intact = journal.read_bytes()
    with open(journal, "ab") as handle:
        handle.write(b'{"type":"evaluation","split":"sea')
    result = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
    assert result.returncode == 0, result.stderr
    after = journal.read_bytes()
    assert after.startswith(intact)  # the torn line is gone; what follows is this session's lines
    added = [json.loads(line) for line in after[len(intact):].splitlines()]
    assert [record["type"] for record in added] == ["session", "selection", "finish"]


def test_a_changed_recipe_is_refused_unless_restarted(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    refused = optimize_cli(recipe_file, run_dir, "--seed", "7")
    assert refused.returncode == 2 and len(lines(refused.stderr)) == 1
    assert "holds a run searched with seed 0, and this command asks for seed 7" in refused.stderr
    assert "drop --seed" in refused.stderr and "--restart" in refused.stderr

    data = yaml.safe_load(recipe_file.read_text())
    data["tasks"][0]["weight"] = 2.0
    other = recipe_file.parent / "other-weights.yaml"
    other.write_text(yaml.safe_dump(data))
    refused = optimize_cli(other, run_dir)
    assert refused.returncode == 2 and "tasks changed" in refused.stderr

    restarted = optimize_cli(recipe_file, run_dir, "--seed", "7", "--budget", "1", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "journal.jsonl").read_bytes()  # the old run is kept, not deleted
    assert len(evaluated(run_dir)) == 1


def test_a_second_process_on_the_same_run_folder_is_refused(reference, recipe_file, tmp_path):
    from mergekit_recycle.optimize import locked

    run_dir = copy_run(reference[0], tmp_path)
    with locked(run_dir):
        result = optimize_cli(recipe_file, run_dir)
    assert result.returncode == 2 and "another mergekit-recycle optimize is running" in result.stderr


class Failing:
    """The real evaluator, except that chosen search proposals raise or score NaN."""

    def __init__(self, inner: ResidentEvaluator, fail):
        self.inner, self.fail, self.proposals = inner, fail, 0

    def evaluate(self, merge, split):
        is_proposal = split == "search" and len(set(merge.weights.values())) > 2  # no baseline has 3 distinct weights
        if is_proposal:
            self.proposals += 1
            outcome = self.fail(self.proposals)
            if outcome == "raise":
                raise RuntimeError(f"merge exploded on proposal {self.proposals}")
            if outcome == "nan":
                evaluation = self.inner.evaluate(merge, split)
                return evaluation.model_copy(update={"objective": float("nan")})
        return self.inner.evaluate(merge, split)


def run_api(recipe_file: Path, run_dir: Path, fail=None, budget: int = 6):
    recipe = load_recipe(recipe_file)
    build = None
    if fail is not None:
        build = lambda *args: Failing(ResidentEvaluator(*args), fail)  # noqa: E731
    options = RunOptions(run_dir=run_dir, budget=budget, seed=0, device="cpu")
    return optimize(recipe, recipe_file, options, evaluator=build)


def test_failed_candidates_are_journaled_and_the_search_goes_on(recipe_file, tmp_path):
    report = run_api(recipe_file, tmp_path / "run", fail=lambda n: {2: "raise", 3: "nan"}.get(n))
    failed = [r for r in evaluated(tmp_path / "run") if r.status == "failed"]
    assert [r.error.split(":")[0] for r in failed] == ["RuntimeError", "scored NaN"]
    assert all(r.objective is None and r.scores is None for r in failed)
    assert report["evaluations"] == 6 and report["failed"] == 2 and report["rows"][-1]["holdout"]


def test_too_many_failures_in_a_row_stop_with_state_saved(recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SearchAbortedError) as caught:
        run_api(recipe_file, run_dir, fail=lambda n: "raise", budget=8)
    assert caught.value.failures == 5 and "merge exploded" in str(caught.value)
    assert [r.status for r in evaluated(run_dir)] == ["failed"] * 5
    assert json.loads((run_dir / "report.json").read_text())["failed"] == 5
    report = run_api(recipe_file, run_dir, budget=8)  # the cause is gone: the same run continues
    assert report["evaluations"] == 8 and report["failed"] == 5


def test_time_budget_stops_in_time_and_reports(recipe_file, tmp_path):
    started = time.monotonic()
    # A budget no 30 s can reach: a candidate of the small pool takes about 25 ms now.
    result = optimize_cli(recipe_file, tmp_path / "run", "--budget", "100000", "--time-budget", "30s")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stopped_early"] and report["evaluations"] < 100000
    assert elapsed < 30 + 15  # the budget counts from the start of the run; Python's start-up comes on top
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def test_incompatible_checkpoint_is_refused_before_any_evaluation(small_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    directory, _ = small_pool
    wide = AutoModelForCausalLM.from_pretrained(directory / "post-3")
    wide.resize_token_embeddings(wide.config.vocab_size + 8)
    wide.save_pretrained(tmp_path / "wide-vocab")
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data["pool"] = [{"path": str(directory / "post-1")}, {"path": str(directory / "post-2")}, {"path": str(tmp_path / "wide-vocab")}]
    data["task_paths"] = [str(directory / "tasks")]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = optimize_cli(recipe, tmp_path / "run")
    assert result.returncode == 2 and len(lines(result.stderr)) == 1, result.stderr
    assert "pool[2]" in result.stderr and "wide-vocab" in result.stderr
    assert re.search(r"tensor (lm_head|model\.embed_tokens)\.weight has shape \[52, 32\] \(pool\[0\], post-1, has shape \[44, 32\]\)",
                     result.stderr)
    assert not (tmp_path / "run" / "journal.jsonl").exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(directory / "post-2", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    data["pool"][2] = {"path": str(pickled)}
    recipe.write_text(yaml.safe_dump(data))
    result = optimize_cli(recipe, tmp_path / "run")
    assert result.returncode == 2 and "pool[2]" in result.stderr and "pickle" in result.stderr


def test_hub_entries_are_named_until_the_hub_is_supported(small_pool, tmp_path):
    directory, _ = small_pool
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data["pool"].append({"repo": "org/model", "revisions": ["main"]})
    with pytest.raises(PoolError) as caught:
        resolve_pool(parse_recipe(data, directory), directory / "recipe.yaml")
    assert caught.value.location == "pool[6]" and caught.value.checkpoint == "org/model"


@pytest.mark.parametrize("value", ["soon", "0s", "-5m", "1x"])
def test_bad_time_budget_is_refused(recipe_file, tmp_path, value):
    result = optimize_cli(recipe_file, tmp_path / "run", "--time-budget", value)
    assert result.returncode == 2 and "duration" in result.stderr


def test_pool_memory_setting_chooses_streaming_and_bad_values_give_one_line(small_pool, recipe_file, tmp_path, monkeypatch):
    from mergekit_recycle.errors import SettingError
    from mergekit_recycle.resident_merge import pool_fits_in_memory

    pool = resolve_pool(load_recipe(recipe_file), recipe_file)
    monkeypatch.setenv("MERGEKIT_RECYCLE_POOL_MEMORY", "1K")
    assert not pool_fits_in_memory(pool)
    monkeypatch.setenv("MERGEKIT_RECYCLE_POOL_MEMORY", "8G")
    assert pool_fits_in_memory(pool)
    monkeypatch.setenv("MERGEKIT_RECYCLE_POOL_MEMORY", "lots")
    with pytest.raises(SettingError):
        pool_fits_in_memory(pool)
    result = run_cli("optimize", str(recipe_file), "--run-dir", str(tmp_path / "run"), "--budget", "1",
                     env={"MERGEKIT_RECYCLE_POOL_MEMORY": "lots"})
    assert result.returncode == 2 and lines(result.stderr)[-1].startswith("MERGEKIT_RECYCLE_POOL_MEMORY='lots': expected")


def anchored_recipe(small_pool, scale_range=(0.5, 1.5)):
    directory, _ = small_pool
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data |= {"base": {"path": "base"}, "search": {**data["search"], "scale": list(scale_range)}}
    return parse_recipe(data, directory)


def test_with_an_anchor_the_search_also_tunes_the_scale(small_pool, tmp_path):
    from mergekit_recycle.merge import load_merge_config

    directory, _ = small_pool
    options = RunOptions(run_dir=tmp_path / "run", budget=6, seed=0, device="cpu")
    report = optimize(anchored_recipe(small_pool), directory / "recipe.yaml", options)
    proposals = evaluated(tmp_path / "run")
    scales = [r.scale for r in proposals]
    assert all(0.5 <= scale <= 1.5 for scale in scales) and len(set(scales)) == len(scales)
    config, _ = load_merge_config(tmp_path / "run" / "proposals" / f"{proposals[0].id:06d}.yaml")
    assert Path(str(config.base_model.model.path)).name == "base"
    assert config.parameters["scale"] == pytest.approx(scales[0])
    assert "base" not in report["rows"][-1]["weights"]  # the anchor anchors; it is not a pool member


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_the_gpu_matches_the_cpu(reference, recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    report = optimize(recipe, recipe_file, RunOptions(run_dir=tmp_path / "run", budget=3, seed=0, device="cuda"))
    cpu = {row["name"]: row["search"]["objective"] for row in json.loads((reference[0] / "report.json").read_text())["rows"]}
    for row in report["rows"][:-1]:  # baselines: the same merges, scored on another device
        assert row["search"]["objective"] == pytest.approx(cpu[row["name"]], abs=0.01)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")


class FailingSingles:
    """The real evaluator, except that every single-checkpoint merge raises (an out-of-memory, say)."""

    def __init__(self, inner: ResidentEvaluator):
        self.inner = inner

    def evaluate(self, merge, split):
        if len(merge.nonzero()) == 1:
            raise RuntimeError("CUDA out of memory")
        return self.inner.evaluate(merge, split)


def test_failed_baselines_are_scored_again_when_the_run_continues(recipe_file, tmp_path):
    recipe, run_dir = load_recipe(recipe_file), tmp_path / "run"
    options = RunOptions(run_dir=run_dir, budget=2, seed=0, device="cpu")
    with pytest.raises(SearchAbortedError):
        optimize(recipe, recipe_file, options, evaluator=lambda *args: FailingSingles(ResidentEvaluator(*args)))
    report = optimize(recipe, recipe_file, options)
    singles = [row for row in report["rows"] if row["kind"] == "checkpoint"]
    assert len(singles) == 6 and all(row["search"] and row["holdout"] for row in singles)
    failed = [r for r in evaluations(run_dir, "checkpoint") if r.status == "failed"]
    assert len(failed) == 5  # kept in the journal, superseded by the scores that followed
    assert report["finished"] and report["evaluations"] == 2


def test_resume_survives_a_touched_pool_but_not_a_changed_one(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    config = recipe_file.parent / "post-2" / "config.json"
    times = (config.stat().st_atime_ns, config.stat().st_mtime_ns)
    try:
        os.utime(config, ns=(times[0], times[1] + 10**9))  # as a copy or a re-sync would leave it
        again = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
        assert again.returncode == 0, again.stderr
    finally:
        os.utime(config, ns=times)
    from mergekit_recycle.optimize import fingerprint

    copy = tmp_path / "pool"
    shutil.copytree(recipe_file.parent, copy)
    recipe = load_recipe(copy / "recipe.yaml")
    before = fingerprint(recipe, resolve_pool(recipe, copy / "recipe.yaml"))
    data = json.loads((copy / "post-2" / "config.json").read_text())
    (copy / "post-2" / "config.json").write_text(json.dumps({**data, "rms_norm_eps": 1e-5}))
    after = fingerprint(recipe, resolve_pool(recipe, copy / "recipe.yaml"))
    assert [part for part in before if before[part] != after[part]] == ["pool"]


def test_an_anchor_that_is_a_pool_member_keeps_its_name(small_pool):
    directory, _ = small_pool
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data |= {"base": {"path": "post-2"}, "search": {**data["search"], "scale": [0.5, 1.5]}}
    pool = resolve_pool(parse_recipe(data, directory), directory / "recipe.yaml")
    assert pool.names == [f"post-{i}" for i in range(1, 7)] and pool.base.name == "post-2"
    assert [c.name for c in pool.inputs] == pool.names  # read once, not twice


def test_checkpoint_tensors_the_model_does_not_have_are_left_out(small_pool, tmp_path):
    from safetensors.torch import save_file

    directory, _ = small_pool
    for name in ("post-1", "post-2"):
        shutil.copytree(directory / name, tmp_path / name)
        tensors = load_file(tmp_path / name / "model.safetensors")
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as older transformers saved
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data |= {"pool": [{"path": "post-1"}, {"path": "post-2"}], "task_paths": [str(directory / "tasks")]}
    pool = resolve_pool(parse_recipe(data, tmp_path), tmp_path / "recipe.yaml")
    model, _ = load_resident_model(pool, "float32", "cpu")
    ResidentMerger(pool, model, "float32").merge(Merge(weights={"post-1": 1.0, "post-2": 1.0}))
    expected = (load_file(tmp_path / "post-1" / "model.safetensors")["lm_head.weight"]
                + load_file(tmp_path / "post-2" / "model.safetensors")["lm_head.weight"]) / 2
    assert torch.allclose(model.state_dict()["lm_head.weight"], expected, atol=1e-6)


def test_a_limit_on_a_task_group_names_the_field(small_pool, tmp_path):
    directory, _ = small_pool
    tasks = tmp_path / "tasks"
    shutil.copytree(directory / "tasks", tasks)
    (tasks / "toy_group_dev.yaml").write_text("group: toy_group_dev\ntask: [toy_add_dev, toy_shift_dev]\n"
                                              "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data["pool"] = [{"path": str(directory / name)} for name in ("post-1", "post-2")]
    data["task_paths"] = [str(tasks)]
    data["tasks"] = [{"name": "mixed", "search": "toy_group_dev", "holdout": "toy_add_test", "metric": "acc", "limit": 50}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = optimize_cli(recipe, tmp_path / "run")
    assert result.returncode == 2 and "tasks[0].limit" in result.stderr and "group" in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_that_is_not_there_gives_one_line(recipe_file, tmp_path):
    result = optimize_cli(recipe_file, tmp_path / "run", "--device", "cuda")
    assert result.returncode == 2 and len(lines(result.stderr)) == 1 and "--device='cuda'" in result.stderr


def test_a_metric_that_is_better_when_lower_is_refused(small_pool, tmp_path):
    directory, _ = small_pool
    tasks = tmp_path / "tasks"
    shutil.copytree(directory / "tasks", tasks)
    task_file = tasks / "toy_add_dev.yaml"
    task_file.write_text(task_file.read_text().replace("higher_is_better: true", "higher_is_better: false"))
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data["pool"] = [{"path": str(directory / name)} for name in ("post-1", "post-2")]
    data["task_paths"] = [str(tasks)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = optimize_cli(recipe, tmp_path / "run")
    assert result.returncode == 2 and "tasks[0].metric" in result.stderr and "better when lower" in result.stderr, result.stderr


def test_pickle_weights_are_refused_unless_the_entry_allows_them(small_pool, tmp_path):
    directory, _ = small_pool
    pickled = tmp_path / "post-2-pickled"
    shutil.copytree(directory / "post-2", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    data = yaml.safe_load((directory / "recipe.yaml").read_text())
    data |= {"pool": [{"path": str(directory / "post-1")}, {"path": str(pickled)}],
             "task_paths": [str(directory / "tasks")], "output": {"run_dir": str(tmp_path / "run")}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    refused = optimize_cli(recipe, tmp_path / "run", "--budget", "2")
    assert refused.returncode == 2 and len(lines(refused.stderr)) == 1, refused.stderr
    assert "pool[1]" in refused.stderr and "set `allow_pickle: true` on its entry" in refused.stderr

    data["pool"][1]["allow_pickle"] = True
    recipe.write_text(yaml.safe_dump(data))
    allowed = optimize_cli(recipe, tmp_path / "run", "--budget", "2")
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["checkpoints"]) == ["post-1", "post-2-pickled"] and report["evaluations"] == 2
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def test_a_run_from_before_winner_selection_continues_only_with_holdback_0(reference, recipe_file, tmp_path):
    run_dir = copy_run(reference[0], tmp_path)
    # A journal of the version before selection: no `selection` in its fingerprint.
    rewrite(run_dir / "journal.jsonl", lambda record: {**record, "fingerprint": {
        k: v for k, v in record["fingerprint"].items() if k != "selection"}} if record["type"] == "run" else record)
    refused = optimize_cli(recipe_file, run_dir, "--budget", str(BUDGET))
    assert refused.returncode == 2 and len(lines(refused.stderr)) == 1
    assert "from before winner selection" in refused.stderr and "holdback: 0" in refused.stderr
    legacy = recipe_file.parent / "legacy.yaml"
    legacy.write_text(recipe_file.read_text() + "selection: {holdback: 0.0}\n")
    result = optimize_cli(legacy, run_dir, "--budget", str(BUDGET + 2))
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "report.json").read_text())
    # Without a holdback the best merge on the search tasks wins, as it always did.
    best = max((r for r in Journal(run_dir / "journal.jsonl").of_type(EvaluationRecord) if r.split == "search"
                and r.ok), key=lambda r: r.objective)
    assert report["selection"]["holdback"] == 0 and report["winner"]["weights"] == best.weights
    assert "holdback 0" in report["selection"]["reason"]
