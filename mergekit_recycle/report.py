"""The report of a run, built from its journal alone: baselines, the winner, the Pareto front, the Ray
workers, plots.

Because it needs nothing but the journal, `mergekit-recycle report RUN_DIR` can print it for
a run that is still going (the winner so far, without a holdout score until the run ends).
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from mergekit_recycle.config_files import write_atomically
from mergekit_recycle.errors import RunDirError
from mergekit_recycle.journal import Journal, writing
from mergekit_recycle.records import (EvaluationRecord, FinishRecord, KeptRecord, MergeFailedRecord, PublishRecord,
                                      Record, RunRecord, SearchRecord, SelectionRecord, SessionRecord, WorkersRecord)
from mergekit_recycle.run_folder import JOURNAL
from mergekit_recycle.selection import Interval, interval
from mergekit_recycle.simplex import normalise

R = TypeVar("R", bound=Record)
BASELINE_KINDS = ("checkpoint", "uniform", "greedy")
# A weight counts as "used" above this share (the paper's measure of how many checkpoints a merge keeps).
USED_WEIGHT = 0.01
# What the winner is compared with on the holdout tasks.
MARGIN_LABELS = ("best checkpoint", "uniform soup", "greedy soup")
# report.json's `selection`: the fields of the journal's selection record it shows, in this order.
SELECTION_FIELDS = ("winner", "kind", "reference", "challenger", "margin", "lower", "level", "reason", "finalists",
                    "holdback", "confidence", "evaluations")
# tasks.png: a task whose search scores all lie within this of each other is left out (it would show
# nothing but noise on a stretched axis), and at most this many panels are drawn.
FLAT_SPREAD = 0.01
MAX_PANELS = 6


def _of_type(records: Sequence[Record], kind: Type[R]) -> List[R]:
    return [record for record in records if isinstance(record, kind)]


def _evaluations(records: Sequence[Record], split: Optional[str] = None, ok: bool = True) -> List[EvaluationRecord]:
    return [r for r in _of_type(records, EvaluationRecord) if (split is None or r.split == split) and (not ok or r.ok)]


def _in_serial_order(records: Sequence[Record], evaluations: List[EvaluationRecord]) -> List[EvaluationRecord]:
    """`evaluations` in the order a serial run journals them: the checkpoints in pool order, the uniform soup,
    the greedy soup's steps, the proposals by id, then the rest (the CMA-ES mean).

    A run on Ray workers journals each merge of a batch as it arrives; listed and tie-broken in this
    order, its report says what a serial run's says.
    """
    runs = _of_type(records, RunRecord)
    pool = {checkpoint["name"]: index for index, checkpoint in enumerate(runs[0].checkpoints)} if runs else {}

    def rank(record: EvaluationRecord) -> Tuple[int, int]:
        if record.kind == "checkpoint":
            return 0, pool.get(record.name, len(pool))
        if record.kind == "uniform":
            return 1, 0
        if record.kind in ("greedy-step", "greedy"):
            return 2, 0  # evaluated one at a time: journal order is their order
        if record.kind == "proposal":
            return 3, record.id
        return 4, 0

    return sorted(evaluations, key=rank)  # stable: journal order among equals


def _proposals(records: Sequence[Record], ok: bool = True) -> List[EvaluationRecord]:
    """The search's proposals by id, repeats of an earlier merge included."""
    return _in_serial_order(records, [r for r in _evaluations(records, "search", ok=ok) if r.kind == "proposal"])


def _evaluated_proposals(records: Sequence[Record]) -> List[EvaluationRecord]:
    """The proposals the search scored itself and got scores for (a repeat reuses earlier ones, a failure has none)."""
    return [r for r in _proposals(records) if r.reused is None]


def _latest_session(records: Sequence[Record]) -> Sequence[Record]:
    """The records from the latest session on (all of them in a journal without a session)."""
    starts = [index for index, record in enumerate(records) if isinstance(record, SessionRecord)]
    return records[starts[-1] if starts else 0:]


def winner_record(records: Sequence[Record]) -> Optional[EvaluationRecord]:
    """The best evaluated merge on the search objective (the earliest of equals), baselines included:
    the winner of a run that chooses by the search alone, and the best so far of a running search."""
    best = None
    for record in _in_serial_order(records, _evaluations(records, "search")):
        if best is None or record.objective > best.objective:
            best = record
    return best


def _scores(record: Optional[EvaluationRecord]) -> Optional[Dict[str, float]]:
    if record is None or not record.ok:
        return None
    return {**record.scores, "objective": record.objective}


def _scored(records: Sequence[Record], split: str, key: Sequence[float]) -> Optional[EvaluationRecord]:
    """The latest record that scored the merge `key` on `split`."""
    key = tuple(key)
    return next((r for r in reversed(_evaluations(records, split)) if r.key == key), None)


def current_selection(records: Sequence[Record]) -> Optional[SelectionRecord]:
    """The decision of the latest session, once it was made (a running search has none yet)."""
    return next((r for r in reversed(_latest_session(records)) if isinstance(r, SelectionRecord)), None)


def pareto_front(records: Sequence[Record], tasks: List[str]) -> List[EvaluationRecord]:
    """The proposals no other proposal matches or beats on every search task (first of equals kept)."""
    proposals = _evaluated_proposals(records)
    front = []
    for record in proposals:
        mine = [record.scores[t] for t in tasks]
        dominated = any(
            all(o >= m for o, m in zip(theirs, mine)) and (any(o > m for o, m in zip(theirs, mine)) or other.id < record.id)
            for other in proposals if other is not record
            for theirs in [[other.scores[t] for t in tasks]]
        )
        if not dominated:
            front.append(record)
    return front


def _latest(records: Sequence[Record], split: str) -> Dict[Tuple[str, str], EvaluationRecord]:
    """The last record of each baseline on `split` (a failed baseline is tried again on resume)."""
    latest: Dict[Tuple[str, str], EvaluationRecord] = {}
    for record in _in_serial_order(records, _evaluations(records, split, ok=False)):
        if record.kind in BASELINE_KINDS:
            latest[(record.kind, record.name)] = record
    return latest


def build_report(records: Sequence[Record]) -> Dict[str, Any]:
    """report.json's content (see the README for its shape), from the journal's records."""
    runs = _of_type(records, RunRecord)
    if not runs:
        raise ValueError("the journal has no run record")
    run = runs[0]
    sessions = _of_type(records, SessionRecord)
    finishes = _of_type(records, FinishRecord)
    tasks = [task["name"] for task in run.tasks]
    holdouts = _latest(records, "holdout")
    rows = [_row(record, kind, name, holdouts.get((kind, name)))
            for (kind, name), record in _latest(records, "search").items()]
    selection = current_selection(records)
    winner = _scored(records, "search", selection.key) if selection else winner_record(records)
    if winner is not None:
        rows.append(_row(winner, "optimized", "optimized", _scored(records, "holdout", winner.key)))
    for row in rows:
        selected = _scored(records, "selection", _key(row))
        if selected is not None:
            row["selection"] = _scores(selected)
    proposals = _proposals(records, ok=False)
    evaluated = [r for r in proposals if r.reused is None]
    # Records are told apart by identity: two records may be equal (two finishes in one second).
    position = {id(record): index for index, record in enumerate(records)}
    since = position[id(sessions[-1])] if sessions else -1
    # A finish is undone by a failed merge of the winner after it: the run ends only with merged/ written.
    failed_merge = next((r for r in reversed(records) if isinstance(r, MergeFailedRecord)), None)
    merge_failed = bool(finishes) and failed_merge is not None and position[id(failed_merge)] > position[id(finishes[-1])]
    report: Dict[str, Any] = {
        "recipe": run.recipe,
        "fingerprint": run.fingerprint,
        "evaluations": len(evaluated),
        "session_evaluations": sum(1 for r in evaluated if position[id(r)] > since),
        "budget": sessions[-1].budget if sessions else None,
        # Finished when the last session reached its end; a running or killed one has not.
        "finished": (bool(finishes) and position[id(finishes[-1])] > since and not merge_failed
                     if sessions else False),
        "stopped_early": bool(finishes) and finishes[-1].stopped_early,
        "failed": sum(1 for r in evaluated if not r.ok),
        "proposals": len(proposals),
        "tasks": tasks,
        "checkpoints": {c["name"]: c["source"] for c in run.checkpoints},
        "rows": rows,
        "pareto": [{"name": r.name, "search": _scores(r), "weights": r.weights, "scale": r.scale}
                   for r in pareto_front(records, tasks)],
    }
    if merge_failed:
        report["merge_error"] = failed_merge.error
    if winner is not None:
        report["winner"] = {"from": selection.winner if selection else winner.name,
                            "kind": selection.kind if selection else winner.kind,
                            "weights": winner.weights, "scale": winner.scale,
                            "weights_above_1pct": sum(1 for w in winner.weights.values() if w > USED_WEIGHT)}
        if selection:
            chosen = selection.model_dump(mode="json")
            report["selection"] = {field: chosen[field] for field in SELECTION_FIELDS}
        shares = dict(zip(tasks, normalise([task["weight"] for task in run.tasks])))
        report["comparison"] = compare(records, rows, shares)
        report["margins"] = {label: entry["margin"] if entry else None for label, entry in report["comparison"]["margins"].items()}
    workers = workers_section(records)
    if workers is not None:
        report["workers"] = workers
    return report


def workers_section(records: Sequence[Record]) -> Optional[Dict[str, Any]]:
    """What the Ray workers of the latest session that had any did: report.json's `workers`.

    Each worker's utilisation is its busy share of the session's wall time; the totals add the
    workers up. None for a run that never evaluated on workers.
    """
    latest = next((r for r in reversed(records) if isinstance(r, WorkersRecord)), None)
    if latest is None:
        return None

    def busy_share(busy_seconds: float, slots: int = 1) -> Optional[float]:
        return round(busy_seconds / (latest.wall_seconds * slots), 4) if latest.wall_seconds > 0 else None

    each = [{"index": worker["index"], "node": worker["node"], "device": worker["device"],
             "evaluations": worker["evaluations"], "busy_seconds": round(worker["busy_seconds"], 3),
             "utilisation": busy_share(worker["busy_seconds"]), "restarts": worker.get("restarts", 0),
             "lost": worker.get("lost", False)}
            for worker in latest.workers]
    busy = sum(worker["busy_seconds"] for worker in latest.workers)
    return {"count": len(each), "wall_seconds": round(latest.wall_seconds, 3),
            "evaluations": sum(worker["evaluations"] for worker in each), "busy_seconds": round(busy, 3),
            "utilisation": busy_share(busy, len(each)) if each else None, "idle_share": round(latest.idle_share, 4),
            "per_worker": each}


def _key(row: Dict[str, Any]) -> Tuple[float, ...]:
    """The journal's key of a row's merge."""
    from mergekit_recycle.proposal import Merge

    return Merge(weights=row["weights"], scale=row["scale"]).key


def compare(records: Sequence[Record], rows: List[Dict[str, Any]], shares: Dict[str, float]) -> Dict[str, Any]:
    """The winner against every checkpoint and both soups on the holdout tasks, with paired 95% intervals.

    The checkpoint to beat is the one best on holdout, not the one best on the search tasks: two
    checkpoints that tie on the search can differ on held-out data, and a user who already has
    the better one must not be told that the merge beats it when it does not.
    """
    optimized = next((row for row in rows if row["kind"] == "optimized"), None)
    documents = _documents(records, optimized) if optimized else None
    singles = [row for row in rows if row["kind"] == "checkpoint" and row["holdout"]]
    comparison: Dict[str, Any] = {"checkpoints": sum(1 for row in rows if row["kind"] == "checkpoint"),
                                  "scored_on_holdout": len(singles), "beaten": None, "beaten_significantly": None,
                                  "best_checkpoint": None, "margins": {label: None for label in MARGIN_LABELS}}
    if not optimized or not optimized["holdout"]:
        return comparison
    mine = optimized["holdout"]["objective"]

    def against(row: Dict[str, Any]) -> Interval:
        return interval(documents or {}, _documents(records, row) or {}, shares, mine - row["holdout"]["objective"])

    def entry(row: Dict[str, Any], result: Interval) -> Dict[str, Any]:
        same = _key(row) == _key(optimized)  # the selection kept this very baseline
        return {"name": row["name"], **asdict(result), "verdict": "same model" if same else result.verdict}

    versus = {row["name"]: against(row) for row in singles}
    comparison["beaten"] = sum(1 for row in singles if mine > row["holdout"]["objective"])
    comparison["beaten_significantly"] = (sum(1 for result in versus.values() if result.verdict == "better")
                                          if all(result.low is not None for result in versus.values()) else None)
    if singles:
        # The best on holdout; of equals, the one best on the search tasks (the one a user would have kept).
        best = max(singles, key=lambda row: (row["holdout"]["objective"], row["search"]["objective"] if row["search"] else 0))
        comparison["best_checkpoint"] = best["name"]
        comparison["margins"]["best checkpoint"] = entry(best, versus[best["name"]])
    for label, kind in (("uniform soup", "uniform"), ("greedy soup", "greedy")):
        row = next((r for r in rows if r["kind"] == kind and r["holdout"]), None)
        if row is not None:
            comparison["margins"][label] = entry(row, against(row))
    return comparison


def _documents(records: Sequence[Record], row: Dict[str, Any]) -> Optional[Dict[str, List[float]]]:
    """The per-document holdout metrics of a row's merge (journals from before they were kept have none)."""
    record = _scored(records, "holdout", _key(row))
    return record.documents if record else None


def claim(label: str, entry: Optional[Dict[str, Any]]) -> str:
    """One margin in words that never claim more than its interval supports."""
    if entry is None:
        return f"{label}: not scored"
    who = f"{entry['name']}, the best checkpoint on holdout" if label == "best checkpoint" else label
    points = f"{entry['margin'] * 100:+.2f} points"
    if entry.get("low") is None:
        return f"{'ahead of' if entry['margin'] > 0 else 'not ahead of'} {who} by {points} (no interval: no per-document scores)"
    if entry.get("verdict") == "same model":
        return f"the same model as {who}"
    span = f"{points}, 95% CI [{entry['low'] * 100:+.2f}, {entry['high'] * 100:+.2f}]"
    verdict = {"better": "better than", "worse": "worse than", "no different": "no better than"}[
        Interval(entry["margin"], entry["low"], entry["high"]).verdict]
    return f"{verdict} {who}: {span}"


def _row(record: EvaluationRecord, kind: str, name: str, holdout: Optional[EvaluationRecord]) -> Dict[str, Any]:
    return {"name": name, "kind": kind, "weights": record.weights, "scale": record.scale,
            "search": _scores(record), "holdout": _scores(holdout),
            **({"error": record.error} if not record.ok else {})}


def _cell(scores: Optional[Dict[str, float]], key: str) -> str:
    return "—" if not scores else f"{scores[key]:.4f}"


def table(report: Dict[str, Any], splits=("search", "holdout")) -> str:
    """The rows as a Markdown table: every task and the objective, on each split."""
    columns = report["tasks"] + ["objective"]
    header = ["merge", "kind"] + [f"{split} {column}" for split in splits for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["name"], row["kind"]] + [_cell(row[split], c) for split in splits for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margins_line(report: Dict[str, Any]) -> str:
    """The honest comparison in a sentence: how many checkpoints the winner beats, and each margin with its interval."""
    comparison = report.get("comparison")
    if not comparison or comparison.get("beaten") is None:
        return "Holdout: the winner has no holdout score yet."
    significant = comparison.get("beaten_significantly")
    beaten = (f"beats {comparison['beaten']} of the {comparison['scored_on_holdout']} checkpoints on the holdout tasks"
              + (f" ({significant} by more than the 95% interval)" if significant is not None else ""))
    parts = [claim(label, entry) for label, entry in comparison["margins"].items()]
    return f"Holdout: the {_winner_words(report)} {beaten}; it is " + "; ".join(parts) + "."


def _winner_words(report: Dict[str, Any]) -> str:
    winner = report["winner"]
    if winner.get("kind") in BASELINE_KINDS:
        return f"winner ({winner['from']}, a baseline kept by the selection)"
    return "optimized merge"


def selection_line(report: Dict[str, Any]) -> Optional[str]:
    selection = report.get("selection")
    return f"Selection: {selection['reason']}." if selection else None


def holdout_paragraphs(report: Dict[str, Any]) -> List[str]:
    """The margins line, and the selection's reason when there was one: what every summary of a run says."""
    return [margins_line(report)] + ([selection_line(report)] if report.get("selection") else [])


def _percent(share: Optional[float]) -> str:
    return "—" if share is None else f"{share:.0%}"


def workers_line(workers: Dict[str, Any]) -> str:
    """report.json's `workers` in a sentence: each worker's node, device, evaluations and busy share."""
    each = []
    for worker in workers["per_worker"]:
        faults = ((f", restarted {worker['restarts']}×" if worker["restarts"] else "")
                  + (", lost" if worker["lost"] else ""))
        each.append(f"node {worker['node']}: {worker['device']}, {worker['evaluations']} evaluations, "
                    f"{_percent(worker['utilisation'])} busy{faults}")
    idle = (f"; a generation leaves {_percent(workers['idle_share'])} of the worker slots idle"
            if workers["idle_share"] > 0 else "")
    return (f"Workers: {workers['count']} ({'; '.join(each)}), {_percent(workers['utilisation'])} busy in all "
            f"over {workers['wall_seconds']:.0f} s{idle}.")


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# Recycling report: {report['recipe']}", ""]
    budget = f" of {report['budget']}" if report.get("budget") else ""
    lines.append(f"{report['evaluations']}{budget} evaluations ({report['failed']} failed), "
                 f"{report['proposals']} proposals in all (the others repeated a merge already scored)."
                 + (" The time budget stopped the search early." if report.get("stopped_early") else "")
                 + ("" if report.get("finished") else " The run has not finished: the winner so far is shown."))
    if "workers" in report:
        lines += ["", workers_line(report["workers"])]
    if report.get("merge_error"):
        lines += ["", f"Merging the winner into merged/ failed: {report['merge_error']}"]
    lines += ["", "## Search and holdout scores", "", table(report), ""]
    if "margins" in report:
        lines.append("\n\n".join(holdout_paragraphs(report)))
        winner = report["winner"]
        lines += ["", "## The winner", "",
                  f"Found as {winner['from']}; {winner['weights_above_1pct']} of {len(winner['weights'])} weights "
                  f"exceed 1%; scale {winner['scale']:.4f}.", "", "| checkpoint | weight |", "|---|---|"]
        lines += [f"| {name} | {weight:.4f} |" for name, weight in sorted(winner["weights"].items(), key=lambda kv: -kv[1])]
    lines += ["", "## Pareto front of the proposals (search scores)", ""]
    if report["pareto"]:
        lines += ["| proposal | " + " | ".join(report["tasks"]) + " | objective |", "|---|" + "---|" * (len(report["tasks"]) + 1)]
        lines += ["| " + " | ".join([p["name"]] + [f"{p['search'][t]:.4f}" for t in report["tasks"] + ["objective"]]) + " |"
                  for p in report["pareto"]]
    else:
        lines.append("No proposal was evaluated yet.")
    lines += ["", "![objective](progress.png)", "![tasks](tasks.png)", "![weights](weights.png)", ""]
    return "\n".join(lines)


def summary(report: Dict[str, Any], records: Sequence[Record]) -> str:
    """A short Markdown summary of the latest session: a CI job's step summary ($GITHUB_STEP_SUMMARY)."""
    lines = [f"### mergekit-recycle: {report['recipe']}", ""]
    state = "finished" if report.get("finished") else "not finished"
    lines.append(f"**{report['evaluations']} evaluations** ({report['session_evaluations']} in the latest session, "
                 f"{report['failed']} failed in all); the run is {state}"
                 + (", stopped by the time budget" if report.get("stopped_early") else "") + ".")
    if "winner" in report:
        winner = report["winner"]
        lines.append(f"The winner, {winner['from']}, gives {winner['weights_above_1pct']} of "
                     f"{len(winner['weights'])} checkpoints a weight above 1%.")
    lines += ["", table(report, splits=("holdout",)), ""]
    if report.get("margins"):
        lines.append("\n\n".join(holdout_paragraphs(report)))
    outcomes = [r for r in _latest_session(records) if isinstance(r, (PublishRecord, KeptRecord))]
    if outcomes:
        outcome = outcomes[-1]
        # hub_state writes the decision's `summary` and `evaluations` into both kinds of record.
        text = getattr(outcome, "summary", None) or f"{getattr(outcome, 'evaluations', None)} evaluations"
        lines += ["", f"**Hub:** published {outcome.url}: {text}" if isinstance(outcome, PublishRecord)
                  else f"**Hub:** model unchanged on {outcome.repo}: {text}"]
    return "\n".join(lines) + "\n"


def task_panels(tasks: List[str], points: List[Dict[str, float]]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The (x, y) pairs tasks.png plots, and the flat tasks it leaves out.

    `points` are the search scores (with "objective") of every merge plotted. A task on which every
    merge scores within FLAT_SPREAD of every other would get an axis of, say, 0.9965-1.0 that shows
    nothing: it is left out. With fewer than two tasks left, the objective is the other axis.
    """
    def spread(axis: str) -> float:
        values = [point[axis] for point in points if axis in point]
        return max(values) - min(values) if values else 0.0

    informative = [task for task in tasks if spread(task) >= FLAT_SPREAD]
    flat = [task for task in tasks if task not in informative]
    axes = informative if len(informative) >= 2 else (informative or tasks[:1]) + ["objective"]
    return [(a, b) for i, a in enumerate(axes) for b in axes[i + 1:]][:MAX_PANELS], flat


def search_start(report: Dict[str, Any], records: Sequence[Record]) -> Dict[str, float]:
    """name -> search objective of the baselines CMA-ES started from and was shown (pycma's inject):
    the best so far of the search starts from the best of them, not from its first proposal."""
    started = next((r for r in records if isinstance(r, SearchRecord)), None)
    objectives = {row["name"]: row["search"]["objective"] for row in report["rows"]
                  if row["kind"] in BASELINE_KINDS and row["search"]}
    names = [started.start, *started.injected] if started else []
    return {name: objectives[name] for name in names if name in objectives}


def plot(run_dir: Path, report: Dict[str, Any], records: Sequence[Record]) -> List[Path]:
    """progress.png, tasks.png and weights.png in run_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    proposals = _evaluated_proposals(records)
    baselines = [row for row in report["rows"] if row["kind"] != "optimized" and row["search"]]
    kind_colors = {"checkpoint": "black", "uniform": "tab:green", "greedy": "tab:red"}

    figure, axes = plt.subplots(figsize=(9, 4))
    values = [r.objective for r in proposals]
    shown = search_start(report, records)
    best, so_far = [], max(shown.values(), default=float("-inf"))
    for value in values:
        so_far = max(so_far, value)
        best.append(so_far)
    kinds = {row["name"]: row["kind"] for row in baselines}
    for index, (name, value) in enumerate(shown.items()):
        axes.plot([0], [value], "D", color=kind_colors[kinds[name]],
                  label=f"{'CMA-ES started from' if index == 0 else 'shown to CMA-ES'}: {name}")
    axes.plot(range(1, len(values) + 1), values, ".", alpha=0.6, label="proposal")
    if shown:
        axes.plot(range(0, len(values) + 1), [max(shown.values())] + best, "-", label="best so far (with the start)")
    else:
        axes.plot(range(1, len(values) + 1), best, "-", label="best proposal so far")
    singles = [r["search"]["objective"] for r in baselines if r["kind"] == "checkpoint"]
    for row in baselines:
        if row["kind"] != "checkpoint" or row["search"]["objective"] == max(singles):
            axes.axhline(row["search"]["objective"], linestyle=":", linewidth=1, color=kind_colors[row["kind"]],
                         label=f"{row['name'] if row['kind'] != 'checkpoint' else 'best single: ' + row['name']}")
    axes.set(xlabel="evaluation", ylabel="search objective", title="Search progress")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the points, never on them
    paths.append(_save(figure, run_dir / "progress.png"))

    winner = next((row for row in report["rows"] if row["kind"] == "optimized" and row["search"]), None)
    points = ([_scores(r) for r in proposals] + [row["search"] for row in baselines]
              + ([winner["search"]] if winner else []))
    pairs, flat = task_panels(report["tasks"], points)
    shared = [point[axis] for point in points for pair in pairs for axis in pair if axis in point]
    pad = max((max(shared) - min(shared)) * 0.05, 0.005) if shared else 0.05
    limits = (min(shared) - pad, max(shared) + pad) if shared else (0.0, 1.0)
    front = {p["name"] for p in report["pareto"]}
    markers = {"checkpoint": "s", "uniform": "^", "greedy": "v"}
    colors = plt.get_cmap("tab10")
    figure, grid = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs) + 2.5, 4.2), squeeze=False)
    for axes, (a, b) in zip(grid[0], pairs):
        def at(scores: Dict[str, float]) -> Tuple[float, float]:
            return scores[a], scores[b]

        proposal_points = [at(_scores(r)) for r in proposals]
        axes.scatter(*zip(*proposal_points) if proposal_points else ([], []), s=10, alpha=0.4, color="tab:blue",
                     label="proposal")
        on_front = [at(_scores(r)) for r in proposals if r.name in front]
        axes.scatter(*zip(*on_front) if on_front else ([], []), s=30, facecolors="none", edgecolors="black",
                     label="proposal on the Pareto front")
        # Named in the legend, not beside the points: labels of near-equal baselines overlapped.
        for index, row in enumerate(baselines):
            axes.scatter(*at(row["search"]), marker=markers[row["kind"]], s=45, color=colors(index % 10),
                         edgecolors="black", linewidths=0.5, label=f"{row['kind']}: {row['name']}")
        if winner:
            axes.scatter(*at(winner["search"]), marker="*", s=220, color="gold", edgecolors="black", zorder=5,
                         label=f"winner: {report.get('winner', {}).get('from', 'optimized')}")
        axes.set(xlabel=f"{a} (search)", ylabel=f"{b} (search)", xlim=limits, ylim=limits)
        axes.grid(alpha=0.3)
    grid[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    title = "Search scores per task: proposals, Pareto front, baselines and the winner (one scale for all panels)"
    if flat:
        title += f"\nleft out, every merge within {FLAT_SPREAD:g} of the others: {', '.join(flat)}"
    figure.suptitle(title, fontsize=9)
    paths.append(_save(figure, run_dir / "tasks.png"))

    if "winner" in report:
        weights = report["winner"]["weights"]
        figure, axes = plt.subplots(figsize=(max(5, 0.6 * len(weights)), 4))
        axes.bar(list(weights), list(weights.values()))
        axes.axhline(USED_WEIGHT, linestyle=":", color="grey", label="1%")
        axes.set(ylabel="weight", title=f"Winner's weights (scale {report['winner']['scale']:.3f})")
        axes.tick_params(axis="x", rotation=45)
        axes.legend(fontsize=7)
        paths.append(_save(figure, run_dir / "weights.png"))
    return paths


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with writing(path, path.parent):
        figure.savefig(path, dpi=100, bbox_inches="tight")  # "tight": a legend beside the panels is kept
    plt.close(figure)
    return path


def write_report(run_dir: Path, report: Dict[str, Any], records: Sequence[Record]) -> None:
    """report.json, report.md and the plots, each replaced atomically."""
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", markdown(report))):
        with writing(run_dir / name, run_dir):
            write_atomically(run_dir / name, text + "\n")
    plot(run_dir, report, records)


def load_report(run_dir: Path) -> Dict[str, Any]:
    """The report of a finished run, or of a running one as it stands (built from its journal)."""
    path = run_dir / JOURNAL
    if not path.is_file():
        raise RunDirError(run_dir, f"no {JOURNAL} here: not a mergekit-recycle run folder")
    records = Journal(path, repair=False).records
    if not _of_type(records, RunRecord):
        raise RunDirError(run_dir, "the run never got going (its pool could not be loaded): nothing to report yet")
    return build_report(records)
