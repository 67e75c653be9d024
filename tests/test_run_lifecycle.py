"""A run's life outside the happy path: a failed start never blocks the fixed rerun, the run folder and
the disk fail in one line with the journal intact, and what a newcomer reads while a run goes on."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import invoke, lines
from mergekit_recycle.journal import Journal
from mergekit_recycle.optimize import RunOptions, optimize
from mergekit_recycle.records import EvaluationRecord, RunRecord
from mergekit_recycle.recipe import load_recipe
from mergekit_recycle.report import task_panels


def write_recipe(pool, name: str = "recipe.yaml", metric: str = "acc", weight: float = 1.0) -> Path:
    """A two-task recipe over three of the `pool` fixture's checkpoints: a few seconds a run."""
    data = {
        "name": "tiny",
        "pool": [{"path": "ckpt-a"}, {"path": "ckpt-b"}, {"path": "ckpt-c"}],
        "tasks": [{"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test", "metric": metric, "weight": weight},
                  {"name": "sort", "search": "toy_sort_dev", "holdout": "toy_sort_test", "metric": "acc"}],
        "task_paths": ["tasks/"],
        "search": {"budget": 2, "population": 4, "seed": 0},
        "selection": {"holdback": 0.0},
        "merge": {"dtype": "float32", "device": "cpu"},
    }
    path = pool["root"] / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def records(run_dir: Path):
    return Journal(run_dir / "journal.jsonl", repair=False).records


def evaluations(run_dir: Path):
    return [r for r in records(run_dir) if isinstance(r, EvaluationRecord)]


def one_line(result, code: int = 2) -> str:
    assert result.exit_code == code and len(lines(result.stderr)) == 1, (result.exit_code, result.stderr)
    return result.stderr


class Interrupted:
    """Ctrl-C during the first evaluation: a start that journaled its run but evaluated nothing."""

    def __init__(self, *args):
        pass

    def evaluate_many(self, merges, split):
        raise KeyboardInterrupt
        yield  # a generator, as every evaluator's evaluate_many


def test_a_failed_start_never_blocks_the_fixed_rerun_and_a_finished_run_says_what_it_has(pool, tmp_path):
    run_dir = tmp_path / "run"
    typo, fixed = write_recipe(pool, "typo.yaml", metric="accuracy"), write_recipe(pool)
    assert "tasks[0].metric" in one_line(invoke("optimize", str(typo), "--run-dir", str(run_dir), "--quiet"))
    assert not run_dir.exists()  # the start created the folder, evaluated nothing: nothing is left
    if not torch.cuda.is_available():
        assert "--device" in one_line(invoke("optimize", str(fixed), "--run-dir", str(run_dir), "--device", "cuda"))
        assert not run_dir.exists()

    # A start that journaled its run and stopped before any evaluation (in a folder that was there):
    run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        optimize(load_recipe(typo), typo, RunOptions(run_dir=run_dir, budget=2, seed=0, device="cpu"), evaluator=Interrupted)
    assert [r.type for r in records(run_dir)] == ["run", "session"]
    # ...is taken over by the fixed recipe without --restart: a new run record first, the old session kept.
    result = invoke("optimize", str(fixed), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.stderr
    journal = records(run_dir)
    assert [r.type for r in journal[:3]] == ["run", "session", "session"] and len(journal) == len(
        [r for r in journal if not isinstance(r, RunRecord)]) + 1
    assert journal[0].tasks[0]["metric"] == "acc" and journal[0].seed == 0
    # What a newcomer reads: each baseline as it is scored on both splits, each greedy step kept or dropped.
    said = result.stderr
    assert "baseline ckpt-a: search objective" in said and "baseline greedy soup: holdout objective" in said
    steps = [line for line in lines(said) if line.startswith("greedy soup + ")]
    assert len(steps) == 2 and all(line.endswith((": kept", ": dropped")) for line in steps)
    assert any(line.startswith("greedy soup: ckpt-") for line in lines(said))
    # merged/ says what it is and how to rebuild it from what it holds.
    readme = (run_dir / "merged" / "README.md").read_text()
    assert "\n# tiny\n" in readme and "merged.partial" not in readme
    assert "winner.yaml" not in readme and "winner.yaml" not in (run_dir / "merged" / "mergekit_config.yml").read_text()

    before = records(run_dir)
    smaller = invoke("optimize", str(fixed), "--run-dir", str(run_dir), "--budget", "1")
    assert smaller.exit_code == 0 and "None" not in smaller.stderr, smaller.stderr
    assert "the run already has 2 evaluations (budget 1): nothing more to search; --budget +N" in smaller.stderr
    seeded = one_line(invoke("optimize", str(fixed), "--run-dir", str(run_dir), "--seed", "5", "--quiet"))
    assert "holds a run searched with seed 0, and this command asks for seed 5" in seeded
    assert "drop --seed" in seeded and "--restart" in seeded
    assert evaluations(run_dir) == [r for r in before if isinstance(r, EvaluationRecord)]

    both = invoke("report", str(run_dir), "--json", "--summary")
    assert "--json and --summary cannot be combined" in one_line(both)


def test_a_full_disk_names_the_file_and_keeps_the_journal(pool, tmp_path):
    run_dir, recipe = tmp_path / "run", write_recipe(pool)
    assert invoke("optimize", str(recipe), "--run-dir", str(run_dir), "--quiet").exit_code == 0
    journal = (run_dir / "journal.jsonl").read_bytes()
    proposals = [r for r in evaluations(run_dir) if r.kind == "proposal"]
    # The next proposal's file is written through a link to /dev/full: a real ENOSPC.
    following = f"{max(r.id for r in proposals) + 1:06d}.yaml"
    (run_dir / "proposals" / f"{following}.partial").symlink_to("/dev/full")
    full = one_line(invoke("optimize", str(recipe), "--run-dir", str(run_dir), "--budget", "+1", "--quiet"))
    assert f"writing proposals/{following} failed: No space left on device" in full and "free some space" in full
    assert (run_dir / "journal.jsonl").read_bytes().startswith(journal)
    assert [r for r in evaluations(run_dir) if r.kind == "proposal"] == proposals
    (run_dir / "proposals" / f"{following}.partial").unlink()

    # merged/ on a full disk: merged.partial/ links to a 64 KiB tmpfs (root only), where the weights do not fit.
    small = tmp_path / "small-disk"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.rmtree(run_dir / "merged")
        (run_dir / "merged.partial").symlink_to(small)
        failed = one_line(invoke("optimize", str(recipe), "--run-dir", str(run_dir), "--budget", "+1", "--quiet"), code=1)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert "merging the winner into merged/ failed" in failed and "writing merged/" in failed
    assert "No space left on device" in failed and "unexpected" not in failed
    assert len([r for r in evaluations(run_dir) if r.kind == "proposal" and r.reused is None]) == 3
    assert not (run_dir / "merged").exists() and json.loads((run_dir / "report.json").read_text())["finished"] is False


def test_run_folders_and_recipes_that_cannot_be_refuse_in_one_line(pool, tmp_path):
    recipe = write_recipe(pool)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    long_name = "x" * 300
    cases = [
        (["optimize", str(recipe), "--run-dir", str(a_file / "run")], [f"{a_file} is a file, not a folder", "--run-dir"]),
        (["optimize", str(recipe), "--run-dir", str(tmp_path / long_name / "run")],
         ["is 300 bytes long, and the file system allows", "--run-dir"]),
        (["optimize", str(pool["root"])], [f"{pool['root']}: is a folder, not a recipe file", "recipe.yaml?"]),
        (["validate", str(tmp_path / long_name / "recipe.yaml")], ["longer than the file system allows"]),
    ]
    for args, words in cases:
        message = one_line(invoke(*args, "--quiet") if args[0] == "optimize" else invoke(*args))
        assert all(word in message for word in words) and "unexpected" not in message, message
        assert long_name not in message  # echoed names are cut short
    assert not os.path.lexists(tmp_path / long_name)


def test_tasks_png_leaves_out_flat_tasks_and_shares_one_scale():
    points = [{"add": 0.2 + i / 10, "sort": 0.5 - i / 20, "copy": 1.0 - i / 1000, "objective": 0.5} for i in range(5)]
    assert task_panels(["add", "sort", "copy"], points) == ([("add", "sort")], ["copy"])
    # One informative task: plotted against the objective; none: the first task against the objective.
    assert task_panels(["add", "copy"], points) == ([("add", "objective")], ["copy"])
    assert task_panels(["copy"], points) == ([("copy", "objective")], ["copy"])
    many = [{**{f"t{j}": (i * (j + 1)) % 7 / 7 for j in range(5)}, "objective": 0.5} for i in range(7)]
    assert len(task_panels([f"t{j}" for j in range(5)], many)[0]) == 6
