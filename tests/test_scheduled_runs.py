"""Scheduled runs (`optimize --resume-from-hub --push`), as the recycle.yml workflow makes them: every run
is a fresh checkout on a fresh runner, with nothing but the Hub in common. The real huggingface_hub
client talks to our Hub-protocol server (tests/hub_server.py) on 127.0.0.1."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import yaml

from conftest import lines, run_cli
from hub_server import HubServer

TOKEN = "hf_write_alice_0123456789abcdef"
POPULATION, GENERATIONS = 4, 2
NIGHT = f"+{POPULATION * GENERATIONS}"  # each night adds two generations
REPOS = itertools.count()


@pytest.fixture(scope="module")
def server():
    with HubServer(tokens={TOKEN: ("alice", "write")}, orgs={"alice": []}) as hub:
        yield hub


class Runner:
    """One ephemeral runner: its own checkout of the repo (the demo pool and the recipe) and its own HF cache."""

    def __init__(self, server: HubServer, small_pool, root: Path, repo: str, pool: Optional[List[dict]] = None):
        self.server, self.root, self.repo = server, root, repo
        shutil.copytree(small_pool[0], root / "checkout")
        recipe = yaml.safe_load((root / "checkout" / "recipe.yaml").read_text())
        recipe["search"].update(population=POPULATION)
        recipe["pool"] = pool or recipe["pool"]
        recipe["output"].update(hub_repo=repo, private=False, run_dir="runs/recycle")
        self.recipe = root / "checkout" / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.run_dir = root / "checkout" / "runs" / "recycle"
        self.env = {"HF_ENDPOINT": server.url, "HF_HOME": str(root / "hf-home"), "HF_TOKEN": TOKEN,
                    "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "MERGEKIT_RECYCLE_SAVE_INTERVAL": "0"}  # a save every generation, however short

    def args(self, budget: str, *flags: str) -> List[str]:
        return ["optimize", str(self.recipe), "--resume-from-hub", "--push", "--budget", budget,
                "--time-budget", "1h", "--quiet", *flags]

    def optimize(self, budget: str = NIGHT, *flags: str, **env: str) -> subprocess.CompletedProcess:
        return run_cli(*self.args(budget, *flags), env={**self.env, **env})

    def report(self) -> dict:
        return json.loads((self.run_dir / "report.json").read_text())

    def journal(self) -> List[dict]:
        return [json.loads(line) for line in (self.run_dir / "journal.jsonl").read_text().splitlines()]


@pytest.fixture
def night(server, small_pool, tmp_path, request):
    """Runners for one output repo of this test's own: night() is the next night's runner."""
    repo = f"alice/nightly-{next(REPOS)}"
    count = iter(range(1, 100))
    return lambda pool=None: Runner(server, small_pool, tmp_path / f"night-{next(count)}", repo, pool)


def hub_journal(server: HubServer, repo: str, revision: str = "main") -> List[dict]:
    return [json.loads(line) for line in server.files(repo, revision)["recycle/journal.jsonl"].splitlines()]


def evaluations(records: List[dict]) -> int:
    return len({r["id"] for r in records if r.get("type") == "evaluation" and r["kind"] == "proposal"
                and r["reused"] is None})


def published_report(server: HubServer, repo: str, objective: float) -> None:
    """Make the repo's published model one that scores `objective` on the holdout tasks (another winner)."""
    report = json.loads(server.files(repo)["recycle/report.json"])
    for row in report["rows"]:
        if row["kind"] == "optimized":
            row["holdout"]["objective"] = objective
    report["winner"]["weights"] = {name: 0.0 for name in report["winner"]["weights"]}
    server.commit(repo, {"recycle/report.json": json.dumps(report).encode()}, message="a model published by hand")


def test_nightly_runs_continue_one_search_and_publish_only_when_the_holdout_improves(night, server):
    first = night()
    result = first.optimize()
    assert result.returncode == 0, result.stderr
    repo = first.repo
    assert f"published {server.url}/{repo}/commit/" in result.stdout and "first model" in result.stdout
    titles = server.titles(repo)
    # The baselines, then every generation, saved as they finished; then the model; then the final state.
    saves = [t for t in titles if t.startswith("mergekit-recycle: search state") and "model" not in t]
    assert len(saves) == 1 + GENERATIONS, titles
    assert titles[-2].startswith("mergekit-recycle: first model, holdout objective ")
    assert titles[-1].endswith("published a new model")
    files = server.files(repo)
    assert {"model.safetensors", "README.md", "recycle/report.json", "recycle/journal.jsonl", "recycle/search.json"} <= set(files)
    assert hub_journal(server, repo) [-1]["type"] == "publish"
    assert json.loads(files["recycle/search.json"])["generation"] == GENERATIONS
    assert evaluations(hub_journal(server, repo)) == POPULATION * GENERATIONS
    model = files["model.safetensors"]

    # Night 2 cannot beat the published model (it scores 1.0): the model stays, the state moves on.
    published_report(server, repo, 1.0)
    second = night()
    result = second.optimize()
    assert result.returncode == 0, result.stderr
    assert f"model unchanged on {repo}: holdout objective " in result.stdout
    assert "does not beat the published 1.0000" in result.stdout
    assert not (second.run_dir / "merged").exists()  # a winner that is not published is not written to disk
    report = second.report()
    assert report["evaluations"] == 2 * POPULATION * GENERATIONS and report["session_evaluations"] == POPULATION * GENERATIONS
    files = server.files(repo)
    assert files["model.safetensors"] == model and json.loads(files["recycle/report.json"])["evaluations"] == POPULATION * GENERATIONS
    hub = hub_journal(server, repo)
    assert evaluations(hub) == 2 * POPULATION * GENERATIONS and hub[-1]["type"] == "kept"
    assert "model unchanged: holdout objective" in server.titles(repo)[-1]
    # What night 1 evaluated is night 2's journal's start, untouched.
    first_records = [r for r in first.journal() if r.get("type") != "run"]
    assert [r for r in second.journal() if r.get("type") != "run"][:len(first_records)] == first_records

    # Night 3 beats a published model that scores 0.0: a new model revision, saying by how much.
    published_report(server, repo, 0.0)
    third = night()
    result = third.optimize()
    assert result.returncode == 0, result.stderr
    mine = next(r for r in third.report()["rows"] if r["kind"] == "optimized")["holdout"]["objective"]
    assert f"holdout objective 0.0000 → {mine:.4f} (+{mine:.4f})" in result.stdout
    assert server.titles(repo)[-2] == (f"mergekit-recycle: holdout objective 0.0000 → {mine:.4f} (+{mine:.4f}) "
                                       f"({3 * POPULATION * GENERATIONS} evaluations)")
    assert json.loads(server.files(repo)["recycle/report.json"])["evaluations"] == 3 * POPULATION * GENERATIONS
    assert (third.run_dir / "merged" / "model.safetensors").read_bytes() == server.files(repo)["model.safetensors"]

    summary = run_cli("report", str(third.run_dir), "--summary")
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.startswith("### mergekit-recycle: toy-recycle\n")
    assert f"**{3 * POPULATION * GENERATIONS} evaluations** ({POPULATION * GENERATIONS} in the latest session" in summary.stdout
    assert "| merge | kind | holdout add | holdout sort | holdout shift | holdout objective |" in summary.stdout
    assert f"**Hub:** published {server.url}/{repo}/commit/" in summary.stdout

    # Publishing night 1's folder by hand brings back its model, not its (older) search state.
    state = server.files(repo)["recycle/journal.jsonl"]
    by_hand = run_cli("publish", str(first.run_dir), env=first.env)
    assert by_hand.returncode == 0, by_hand.stderr
    assert f"the search state in {repo} is ahead of {first.run_dir} or another run's: kept as it is" in by_hand.stderr
    assert server.files(repo)["recycle/journal.jsonl"] == state
    assert json.loads(server.files(repo)["recycle/report.json"])["evaluations"] == POPULATION * GENERATIONS


def test_a_night_without_improvement_keeps_the_model_it_found_itself(night, server):
    first = night()
    assert first.optimize(MERGEKIT_RECYCLE_SAVE_INTERVAL="3600").returncode == 0
    # Saves an hour apart: the baselines' only, then the model and the final state.
    assert [t.split(",")[0] for t in server.titles(first.repo)[-3:]] == [
        "mergekit-recycle: search state", "mergekit-recycle: first model", "mergekit-recycle: search state"]
    assert len([t for t in server.titles(first.repo) if t.startswith("mergekit-recycle: search state")]) == 2
    model_commits = len([t for t in server.titles(first.repo) if "first model" in t])
    second = night()
    result = second.optimize("+0")  # nothing new to search: the same winner, scored the same
    assert result.returncode == 0, result.stderr
    assert "model unchanged" in result.stdout and "the published model is this winner" in result.stdout
    assert len([t for t in server.titles(first.repo) if "first model" in t or "→" in t]) == model_commits


def test_a_runner_killed_mid_search_lets_the_next_one_resume(night, server):
    first = night()
    script = Path(sys.executable).parent / "mergekit-recycle"
    process = subprocess.Popen([str(script), *first.args("+400")], env={**os.environ, **first.env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if len([t for t in _titles(server, first.repo) if t.startswith("mergekit-recycle: search state")]) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    saved = hub_journal(server, first.repo)
    killed = evaluations(first.journal())
    assert evaluations(saved) >= POPULATION and killed - evaluations(saved) <= POPULATION  # at most a generation lost

    second = night()
    result = second.optimize()
    assert result.returncode == 0, result.stderr
    assert second.report()["evaluations"] == evaluations(saved) + POPULATION * GENERATIONS
    resumed = [r for r in second.journal() if r.get("type") != "run"]
    assert resumed[:len(saved) - 1] == [r for r in saved if r.get("type") != "run"]


def _titles(server: HubServer, repo: str) -> List[str]:
    try:
        return server.titles(repo)
    except Exception:  # noqa: BLE001 - the repo is not created yet
        return []


@pytest.mark.parametrize("touches_state", [True, False], ids=["another-run", "an-unrelated-edit"])
def test_a_concurrent_writer_stops_the_run_but_an_unrelated_commit_does_not(night, server, touches_state):
    runner = night()
    repo = runner.repo
    interloper = {"recycle/journal.jsonl": b'{"type":"run","recipe":"another run"}\nnot JSON\n'} if touches_state else {
        "README.md": b"# edited on the Hub while the search ran\n"}

    def commit_in_between(repo_id: str, sha: str, title: str) -> None:
        if repo_id == repo and title.startswith("mergekit-recycle: search state"):
            server.after_commit = None
            server.commit(repo, interloper, message="someone else's commit")

    server.after_commit = commit_in_between
    try:
        result = runner.optimize()
    finally:
        server.after_commit = None
    if not touches_state:
        assert result.returncode == 0, result.stderr
        assert "someone else's commit" in server.titles(repo)
        assert evaluations(hub_journal(server, repo)) == POPULATION * GENERATIONS
        return
    assert result.returncode == 1 and len(lines(result.stderr)) == 1, result.stderr
    assert f"{repo}: another run saved its search state there" in result.stderr
    assert "someone else's commit" in result.stderr
    assert server.files(repo)["recycle/journal.jsonl"] == interloper["recycle/journal.jsonl"]  # not overwritten
    assert server.titles(repo)[-1] == "someone else's commit"
    assert evaluations(runner.journal()) > 0  # this run's evaluations stay in its run folder

    again = runner.optimize()  # the Hub's state is the other writer's now, and not even readable
    assert again.returncode == 1 and len(lines(again.stderr)) == 1, again.stderr
    assert f"{repo}: search state: recycle/journal.jsonl line 2 at commit " in again.stderr
    assert "rerun with --restart" in again.stderr
    restarted = runner.optimize(NIGHT, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert hub_journal(server, repo)[0]["started"] == runner.journal()[0]["started"]


def test_the_hub_failing_never_costs_the_state(night, server):
    first = night()
    repo = first.repo
    # The first save's commit lands, but its answer is lost (a 500; huggingface_hub retries, gets a 412):
    # the run sees its own commit there, and goes on.
    server.fail_next("POST", f"/api/models/{repo}/commit/", 500, landed=True)
    result = first.optimize()
    assert result.returncode == 0, result.stderr
    state = server.files(repo)["recycle/journal.jsonl"]
    assert [json.loads(line) for line in state.splitlines()][-1]["type"] == "publish"

    # The Hub answers 503 while the next night reads the state: one line, and nothing replaced.
    second = night()
    server.fail_next("HEAD", f"/{repo}/resolve/", 503, times=20)  # huggingface_hub retries for 23 s, then gives up
    try:
        failed = second.optimize()
    finally:
        server.clear_failures()
    assert failed.returncode == 1 and lines(failed.stderr)[-1].startswith(f"{repo}: search state: "), failed.stderr
    assert server.files(repo)["recycle/journal.jsonl"] == state and not second.run_dir.exists()

    # A published report that is not ours to read: the model it describes is replaced.
    server.commit(repo, {"recycle/report.json": b"[1, 2]"}, message="a report of another tool")
    third = night()
    result = third.optimize()
    assert result.returncode == 0, result.stderr
    assert "recycle/report.json gives no holdout objective" in result.stdout
    assert third.report()["evaluations"] == 2 * POPULATION * GENERATIONS


def test_a_hub_pool_stays_pinned_across_runners_after_its_branch_moves(night, server, small_pool):
    pool_repo = f"lab/pool-{next(REPOS)}"
    folders = {f"checkpoint-{i}": small_pool[0] / f"post-{i}" for i in (1, 2, 3)}
    server.create_repo(pool_repo)
    pinned = server.commit(pool_repo, folders)
    pool = [{"repo": pool_repo, "subfolders": ["checkpoint-*"]}] + [{"path": f"post-{i}"} for i in (4, 5, 6)]
    first = night(pool)
    assert first.optimize().returncode == 0
    # The lab pushes on: a new checkpoint, and another's weights replaced.
    moved = server.commit(pool_repo, {"checkpoint-4": small_pool[0] / "post-4", "checkpoint-1": small_pool[0] / "post-5"})
    served = len(server.requests)

    second = night(pool)  # a fresh runner: the pins come from the search state on the Hub
    result = second.optimize()
    assert result.returncode == 0, result.stderr
    run = second.journal()[0]
    assert {c["sha"] for c in run["checkpoints"] if c["repo"]} == {pinned}
    assert [c["name"] for c in run["checkpoints"]][:3] == [f"{pool_repo}@main/checkpoint-{i}" for i in (1, 2, 3)]
    assert not [path for _, path, _ in server.requests[served:] if moved in path]
    assert second.report()["evaluations"] == 2 * POPULATION * GENERATIONS
