"""The report of a run on Ray workers, from journals written by hand: its `workers` section (what each worker of
a session did), and a report that does not depend on the order in which a batch's merges arrived."""

import json
from pathlib import Path
from typing import List, Optional

from conftest import invoke
from mergekit_recycle.journal import Journal
from mergekit_recycle.records import (EvaluationRecord, FinishRecord, Record, RunRecord, SessionRecord,
                                      WorkersRecord)
from mergekit_recycle.report import build_report, markdown

STARTED = "2025-01-01T00:00:00+00:00"
WEIGHTS = {"ckpt-a": 0.5, "ckpt-b": 0.5}


def evaluation(name: str, kind: str, objective: float, worker: Optional[int] = None, **proposal) -> EvaluationRecord:
    return EvaluationRecord(split="search", kind=kind, name=name, weights=WEIGHTS, key=[0.5, 0.5, 1.0], status="ok",
                            scores={"add": objective}, objective=objective, worker=worker, **proposal)


def session(workers: Optional[int] = None) -> SessionRecord:
    return SessionRecord(started=STARTED, budget=2, seed=0, workers=workers)


def serial_run() -> List[Record]:
    """A run of one session evaluated in the driver process."""
    run = RunRecord(recipe="toy", tasks=[{"name": "add", "search": "toy_add_dev", "holdout": "toy_add_test",
                                          "metric": "acc", "weight": 1.0}],
                    checkpoints=[{"name": name, "source": name} for name in WEIGHTS])
    return [run, session(), evaluation("uniform soup", "uniform", 0.5),
            evaluation("proposal 000000", "proposal", 0.6, id=0, generation=0, coordinates=[0.0]), FinishRecord()]


def two_workers(wall_seconds: float = 100.0) -> WorkersRecord:
    return WorkersRecord(wall_seconds=wall_seconds, idle_share=0.25, workers=[
        {"index": 0, "node": "10.0.0.1", "device": "cpu", "evaluations": 14, "busy_seconds": 93.0, "restarts": 0,
         "lost": False},
        {"index": 1, "node": "10.0.0.2", "device": "cuda:0", "evaluations": 12, "busy_seconds": 81.0, "restarts": 1,
         "lost": True}])


def test_a_run_that_never_used_workers_has_no_workers_section():
    report = build_report(serial_run())
    assert "workers" not in report and "Workers:" not in markdown(report)


def test_the_workers_section_gives_each_worker_s_node_device_evaluations_and_utilisation():
    records = serial_run()[:-1] + [two_workers(), FinishRecord()]
    workers = build_report(records)["workers"]
    assert workers["count"] == 2 and workers["evaluations"] == 26 and workers["idle_share"] == 0.25
    assert workers["wall_seconds"] == 100.0 and workers["busy_seconds"] == 174.0
    assert workers["utilisation"] == 0.87
    first, second = workers["per_worker"]
    assert first == {"index": 0, "node": "10.0.0.1", "device": "cpu", "evaluations": 14, "busy_seconds": 93.0,
                     "utilisation": 0.93, "restarts": 0, "lost": False}
    assert second["node"] == "10.0.0.2" and second["utilisation"] == 0.81 and second["restarts"] == 1 and second["lost"]
    line = next(line for line in markdown(build_report(records)).splitlines() if line.startswith("Workers:"))
    assert line == ("Workers: 2 (node 10.0.0.1: cpu, 14 evaluations, 93% busy; node 10.0.0.2: cuda:0, 12 evaluations, "
                    "81% busy, restarted 1×, lost), 87% busy in all over 100 s; a generation leaves 25% of the "
                    "worker slots idle.")


def test_the_latest_session_with_workers_is_reported_and_a_later_serial_session_keeps_it():
    earlier = WorkersRecord(wall_seconds=10.0, workers=[
        {"index": 0, "node": "old", "device": "cpu", "evaluations": 1, "busy_seconds": 5.0, "restarts": 0,
         "lost": False}])
    records = serial_run()[:2] + [earlier, session(workers=2), two_workers(), session()]
    workers = build_report(records)["workers"]
    assert [worker["node"] for worker in workers["per_worker"]] == ["10.0.0.1", "10.0.0.2"]
    # A session that measured no wall time has no utilisation to give (not a division by zero).
    assert build_report(serial_run() + [two_workers(wall_seconds=0.0)])["workers"]["utilisation"] is None


def test_report_json_reads_the_workers_back_from_the_journal(tmp_path: Path):
    journal = Journal(tmp_path / "journal.jsonl")
    for record in serial_run()[:-1] + [two_workers(), FinishRecord()]:
        journal.append(record)
    result = invoke("report", str(tmp_path), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["workers"] == build_report(journal.records)["workers"]
    serial = tmp_path / "serial"
    journal = Journal(serial / "journal.jsonl")
    for record in serial_run():
        journal.append(record)
    assert "workers" not in json.loads(invoke("report", str(serial), "--json").stdout)


def test_a_batch_journaled_as_its_merges_arrived_reports_as_a_serial_run():
    def scored(name: str, kind: str, weights: dict, **proposal) -> EvaluationRecord:
        return EvaluationRecord(split="search", kind=kind, name=name, weights=weights,
                                key=[weights["ckpt-a"], weights["ckpt-b"], 1.0], status="ok", scores={"add": 0.6},
                                objective=0.6, **proposal)

    run, first_session = serial_run()[:2]
    a = scored("ckpt-a", "checkpoint", {"ckpt-a": 1.0, "ckpt-b": 0.0})
    b = scored("ckpt-b", "checkpoint", {"ckpt-a": 0.0, "ckpt-b": 1.0})
    uniform = scored("uniform soup", "uniform", WEIGHTS)
    proposals = [scored(f"proposal {i:06d}", "proposal", {"ckpt-a": 0.2 + i / 10, "ckpt-b": 0.8 - i / 10}, id=i,
                         generation=0, coordinates=[float(i)]) for i in range(2)]
    serial = [run, first_session, a, b, uniform, *proposals, FinishRecord()]
    arrived = [run, first_session, uniform, b, a, proposals[1], proposals[0], FinishRecord()]
    report = build_report(serial)
    # Every merge ties: the earliest of a serial run wins, whatever order the workers returned them in.
    assert report["winner"]["from"] == "ckpt-a" and [row["name"] for row in report["rows"]][:3] == [
        "ckpt-a", "ckpt-b", "uniform soup"]
    assert json.dumps(build_report(arrived)) == json.dumps(report)
