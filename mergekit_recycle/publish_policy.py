"""Publish only when better: a scheduled run replaces the model in its output repo only when its
winner's holdout objective beats the published one's, on the same tasks.

`conclude` ends a `--resume-from-hub` run: it asks `decide` against the repo's recycle/report.json,
then either pushes the winner (publish.py) on top of the search state's head, or journals that the
model was kept; either way the final search state is committed (hub_state.py). Reports here are
report.json as written (report.py), so they are read as JSON.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from mergekit_recycle.errors import HubStateError, PublishError
from mergekit_recycle.hub_state import HubState, state_files
from mergekit_recycle.journal import Journal, now
from mergekit_recycle.publish import Destination, publish
from mergekit_recycle.records import KeptRecord
from mergekit_recycle.run_folder import JOURNAL

Report = Dict[str, Any]  # report.json


def conclude(hub_state: HubState, run_dir: Path, report: Report, destination: Destination, push: bool,
             say: Callable[[str], None], merge_winner: Callable[[], Any]) -> str:
    """After the search: a new model revision if the holdout objective improved (merge_winner() writes it
    to RUN_DIR/merged first), else the state alone. Returns one line saying which, and why.
    """
    decision = decide(report, hub_state.published_report() if push else None, push)
    if decision.publish:
        merge_winner()
        staged = state_files(run_dir)  # what the model's commit holds: publish() journals the push after it
        try:
            info = hub_state.commit(lambda parent: publish(run_dir, destination, say, parent_commit=parent,
                                                           message=decision.title, note=decision.record), staged)
        except PublishError:
            # The next run publishes when it still beats the model; it must find this run's state.
            with contextlib.suppress(HubStateError):
                hub_state.save(run_dir, say, final=True, message=f"mergekit-recycle: search state, "
                               f"{report['evaluations']} evaluations; publishing the model failed")
            raise
        outcome = f"published {info.commit_url}: {decision.summary}"
    else:
        Journal(run_dir / JOURNAL).append(KeptRecord(**{"repo": hub_state.repo_id, **decision.record,
                                                        "time": now()}))
        outcome = f"model unchanged on {hub_state.repo_id}: {decision.summary}"
    hub_state.save(run_dir, say, message=f"mergekit-recycle: search state, {report['evaluations']} evaluations; "
                   + ("published a new model" if decision.publish else "model unchanged: " + decision.summary),
                   final=True)
    return outcome


@dataclass(frozen=True)
class Decision:
    """Whether to publish this run's winner, and why."""

    publish: bool
    summary: str  # why, in a few words
    title: str  # the commit message of a new model revision
    record: Dict[str, Any]  # what the journal keeps of the decision: fields of its publish or kept record


def holdout_objective(report: Optional[Report]) -> Optional[float]:
    """The optimized merge's holdout objective in a report (None when it was not scored, or not readable)."""
    try:
        row = next((r for r in (report or {}).get("rows", []) if r.get("kind") == "optimized"), None)
        value = row["holdout"]["objective"] if row and row.get("holdout") else None
    except (AttributeError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _same_tasks(mine: Report, theirs: Report) -> bool:
    """The same tasks, metrics and weights (reports from before the fingerprint: the same task names)."""
    if isinstance(theirs.get("fingerprint"), dict):
        return theirs["fingerprint"].get("tasks") == mine["fingerprint"]["tasks"]
    return theirs.get("tasks") == mine["tasks"]


def decide(report: Report, published: Optional[Report], push: bool) -> Decision:
    """Whether this run's winner should replace the published model (`published`: its recycle/report.json,
    None before the first): only a better holdout objective on the same tasks does (a different winner
    that scores the same does not)."""
    mine, theirs = holdout_objective(report), holdout_objective(published)
    record = {"evaluations": report["evaluations"], "winner": report.get("winner", {}).get("from"),
              "holdout": mine, "published_holdout": theirs}

    def keep(why: str) -> Decision:
        return Decision(False, why, "", {**record, "summary": why})

    def replace(why: str, title: str) -> Decision:
        return Decision(True, why, f"mergekit-recycle: {title} ({report['evaluations']} evaluations)",
                        {**record, "summary": why})

    if not push:
        return keep("publishing is off (no --push, and no output.hub_repo)")
    if mine is None:
        return keep("no merge was scored on the holdout tasks")
    if published is None:
        return replace(f"first model, holdout objective {mine:.4f}", f"first model, holdout objective {mine:.4f}")
    if theirs is None:
        return replace(f"the published model's recycle/report.json gives no holdout objective; holdout objective "
                       f"{mine:.4f}", f"replaces a model without a holdout score, holdout objective {mine:.4f}")
    if not _same_tasks(report, published):
        return replace(f"the published model was scored on other tasks; holdout objective {mine:.4f}",
                       f"new tasks, holdout objective {mine:.4f}")
    winner, earlier = report["winner"], published.get("winner") if isinstance(published.get("winner"), dict) else {}
    if (winner["weights"], winner["scale"]) == (earlier.get("weights"), earlier.get("scale")):
        return keep(f"the published model is this winner (holdout objective {mine:.4f})")
    if mine > theirs:
        change = f"holdout objective {theirs:.4f} → {mine:.4f} ({mine - theirs:+.4f})"
        return replace(change, change)
    return keep(f"holdout objective {mine:.4f} does not beat the published {theirs:.4f}")
