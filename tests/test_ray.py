"""`optimize --workers` on Ray: the same run as a serial one, on workers spread over nodes, through faults.

One two-node Ray cluster (ray.cluster_utils.Cluster, one CPU a node, on 127.0.0.1) serves the
module: starting Ray costs seconds. Runs use the demo pool's `small` size, as test_optimize does.
"""

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import invoke, run_cli

# The Ray nodes of these tests (and of the CLI processes they start) name themselves 127.0.0.1: Ray would
# otherwise turn 127.0.0.1 into this machine's network address when it connects. Read when ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

BUDGET = 12  # more than one generation of the small pool (population 9)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each, so that two one-CPU workers land on different nodes."""
    from ray.cluster_utils import Cluster

    started = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    started.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=started.address, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    yield started
    ray.shutdown()
    started.shutdown()


@pytest.fixture(scope="module")
def recipe_file(small_pool) -> Path:
    return small_pool[0] / "recipe.yaml"


# One batch size for every run, serial or on Ray: results equal across runs to the last bit, and a candidate
# long enough (about 0.1 s) for a test to catch a worker in the middle of one.
BATCH = ("--batch-size", "16")


def optimize(recipe_file: Path, run_dir: Path, *args: str, quiet: bool = True):
    """An optimize run in this process; not `quiet`: with its progress lines (the Ray workers' among them)."""
    result = invoke("optimize", str(recipe_file), "--run-dir", str(run_dir), *(["--quiet"] if quiet else []), *BATCH,
                    *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def serial(recipe_file, tmp_path_factory) -> Path:
    """The run without Ray that every Ray run must reproduce."""
    run_dir = tmp_path_factory.mktemp("serial") / "run"
    optimize(recipe_file, run_dir, "--budget", str(BUDGET))
    return run_dir


def evaluations(run_dir: Path) -> dict:
    """(kind, name, split) -> what was evaluated and how it scored, whatever the order results arrived in."""
    records = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    return {(r["kind"], r["name"], r["split"]): r for r in records if r["type"] == "evaluation"}


def assert_same_run(run_dir: Path, reference: Path, continued: bool = False) -> None:
    """The run in `run_dir` evaluated what `reference` did, with the same scores, and chose the same winner.
    A `continued` run finished once before, with a smaller budget: it also holds that session's finalists."""
    mine, theirs = evaluations(run_dir), evaluations(reference)
    extra = {key for key in set(mine) - set(theirs) if key[0] in ("finalist", "mean", "optimized")}
    assert set(mine) - (extra if continued else set()) == set(theirs)
    for key, record in theirs.items():
        other = mine[key]
        assert other["status"] == record["status"], key
        assert other["key"] == record["key"], key
        if record.get("coordinates") is not None:
            assert other["coordinates"] == pytest.approx(record["coordinates"], rel=1e-7), key
        if record["status"] == "ok":
            assert other["scores"] == pytest.approx(record["scores"], abs=1e-9), key
            assert other.get("documents") == record.get("documents"), key
    assert (run_dir / "winner.yaml").read_text() == (reference / "winner.yaml").read_text()
    ours, reference_report = (json.loads((d / "report.json").read_text()) for d in (run_dir, reference))
    assert ours["winner"] == reference_report["winner"]


def test_two_workers_on_two_nodes_reproduce_the_serial_run(cluster, recipe_file, serial, tmp_path):
    run_dir = tmp_path / "ray"
    result = optimize(recipe_file, run_dir, "--budget", str(BUDGET), "--workers", "2", "--cpus-per-worker", "1",
                      quiet=False)
    assert "Ray: 2 workers on 2 nodes" in result.output
    # A population of 9 over 2 workers leaves a slot idle each generation: said once, with the population that fits.
    assert "leaves 1 of 10 worker slots idle (10%); a population of 10" in result.output
    assert_same_run(run_dir, serial)
    workers = json.loads((run_dir / "report.json").read_text())["workers"]
    assert workers["count"] == 2 and workers["idle_share"] == pytest.approx(0.1)
    assert len({worker["node"] for worker in workers["per_worker"]}) == 1  # both nodes are 127.0.0.1
    records = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    placed = [record for record in records if record["type"] == "workers"][-1]["workers"]
    assert len({worker["node_id"] for worker in placed}) == 2  # one worker on each node
    evaluated = [r for r in records if r["type"] == "evaluation" and r["reused"] is None and r["status"] == "ok"]
    assert {r["worker"] for r in evaluated} == {0, 1}
    assert sum(w["evaluations"] for w in workers["per_worker"]) == len(evaluated)
    assert all(0 < w["utilisation"] <= 1 for w in workers["per_worker"])
    assert "Workers: 2" in (run_dir / "report.md").read_text()


class WorkerKiller(threading.Thread):
    """SIGKILLs the first process of this test session that is evaluating a candidate for a Ray worker."""

    def __init__(self, after: int = 3):
        super().__init__(daemon=True)
        self.after = after  # candidates seen in flight before the kill: past the start, mid-search
        self.killed = None
        self.done = threading.Event()

    def run(self) -> None:
        seen = set()
        deadline = time.monotonic() + 240
        while not self.done.is_set() and time.monotonic() < deadline:
            for process in psutil.Process().children(recursive=True):
                try:
                    title = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                if title.startswith("ray::EvaluationWorker.evaluate"):
                    seen.add((process.pid, round(time.monotonic(), 1)))
                    if len(seen) >= self.after:
                        os.kill(process.pid, signal.SIGKILL)
                        self.killed = process.pid
                        return
            time.sleep(0.01)


def test_a_worker_killed_mid_candidate_is_replaced_and_its_candidate_retried(cluster, recipe_file, serial, tmp_path):
    run_dir = tmp_path / "ray"
    killer = WorkerKiller()
    killer.start()
    try:
        result = optimize(recipe_file, run_dir, "--budget", str(BUDGET), "--workers", "2", "--cpus-per-worker", "1",
                          quiet=False)
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed is not None, "no worker was seen evaluating"
    assert "died (" in result.output and "starting another in its place" in result.output
    workers = json.loads((run_dir / "report.json").read_text())["workers"]["per_worker"]
    assert sum(worker["restarts"] for worker in workers) == 1 and not any(worker["lost"] for worker in workers)
    assert_same_run(run_dir, serial)  # the retried candidate scored as it does in the serial run, nothing failed


def test_a_local_folder_missing_on_a_node_is_named_with_the_node(cluster, recipe_file, tmp_path):
    from mergekit_recycle.errors import PoolError
    from mergekit_recycle.pool import resolve_pool
    from mergekit_recycle.ray_evaluator import RayEvaluator
    from mergekit_recycle.recipe import load_recipe

    copy = tmp_path / "pool"
    shutil.copytree(recipe_file.parent, copy)
    recipe = load_recipe(copy / "recipe.yaml")
    pool = resolve_pool(recipe, copy / "recipe.yaml")
    (copy / "post-2").rename(tmp_path / "elsewhere")  # as on a node that lacks the folder
    with pytest.raises(PoolError) as raised:
        RayEvaluator.start(recipe, copy / "recipe.yaml", pool, {}, "cpu", 2, None, 1)
    message = str(raised.value)
    assert raised.value.location == "pool[1]" and str(copy / "post-2") in message
    assert "on Ray node 127.0.0.1" in message and "does not exist on this node" in message
    assert "\n" not in message


def test_a_run_continues_with_another_worker_count_either_way(cluster, recipe_file, serial, tmp_path):
    # Two workers, then none: the Ray part in a process of its own, which starts (and stops) a local Ray.
    first = tmp_path / "ray-then-serial"
    result = run_cli("optimize", str(recipe_file), "--run-dir", str(first), "--budget", "5", *BATCH,
                     "--workers", "2", "--cpus-per-worker", "1", env={"RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr
    assert "Ray: 2 workers on 1 node (127.0.0.1: 2)" in result.stderr
    optimize(recipe_file, first, "--budget", str(BUDGET))
    assert_same_run(first, serial, continued=True)
    # None, then two workers (on this module's cluster).
    second = tmp_path / "serial-then-ray"
    optimize(recipe_file, second, "--budget", "5")
    optimize(recipe_file, second, "--budget", str(BUDGET), "--workers", "2", "--cpus-per-worker", "1")
    assert_same_run(second, serial, continued=True)


def test_ray_asked_for_but_not_installed_is_one_line_and_leaves_no_run_folder(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    run_dir = tmp_path / "run"
    result = invoke("optimize", str(recipe_file), "--run-dir", str(run_dir), "--quiet", "--workers", "2")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == ("--workers and --ray-address run on Ray, which is not "
                                                      "installed: pip install 'mergekit-recycle[ray]' (on every "
                                                      "node of the cluster)")
    assert not run_dir.exists()


def test_cpus_per_worker_alone_is_refused(recipe_file):
    result = invoke("optimize", str(recipe_file), "--cpus-per-worker", "2")
    assert result.exit_code == 2 and "--cpus-per-worker sets the threads of Ray workers" in result.output


# Flaky since issue 17 made candidates ~25 ms: the thread below often misses a worker mid-candidate, and then no
# node is removed. Needs a deterministic trigger (a hook in the evaluator); until then a miss is not a failure.
@pytest.mark.xfail(strict=False, reason="the node is sometimes never removed: the trigger scans process titles")
def test_a_node_lost_mid_run_leaves_fewer_workers_and_the_same_result(cluster, recipe_file, serial, tmp_path,
                                                                      monkeypatch):
    """The node of one worker goes away mid-run; the other node has no room for a replacement, so after the
    placement timeout the run goes on with one worker, and still reproduces the serial run."""
    node = next(iter(cluster.worker_nodes))
    removed = threading.Event()

    def remove_when_busy() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not removed.is_set():
            titles = []
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    titles.append(" ".join(process.cmdline()))
            if sum(title.startswith("ray::EvaluationWorker.evaluate") for title in titles):
                # Short for the replacement only: the first placement, on a busy machine, may take longer.
                monkeypatch.setenv("MERGEKIT_RECYCLE_RAY_PLACEMENT_SECONDS", "3")
                cluster.remove_node(node)
                removed.set()
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_when_busy, daemon=True)
    remover.start()
    run_dir = tmp_path / "ray"
    try:
        result = optimize(recipe_file, run_dir, "--budget", str(BUDGET), "--workers", "2", "--cpus-per-worker", "1",
                          quiet=False)
    finally:
        removed.set()
        remover.join()
        if node not in cluster.worker_nodes:  # the module's later tests get their two nodes back
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    assert "no other node has room for it): continuing with 1 worker" in result.output
    per_worker = json.loads((run_dir / "report.json").read_text())["workers"]["per_worker"]
    assert sorted(worker["lost"] for worker in per_worker) == [False, True]
    assert_same_run(run_dir, serial)
