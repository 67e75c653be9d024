"""The run: a recipe's plan (baselines, CMA-ES, the winner's selection, the holdout report) applied to a run folder.

`optimize` is what `mergekit-recycle optimize` calls. Everything a run learns goes to its
journal before it is used, so a run stopped at any point (Ctrl-C, SIGKILL, the time
budget, too many failures) continues where it stopped when the same command is run again:
baselines and proposals already in the journal are replayed, not evaluated again.

RUN_DIR holds:
  journal.jsonl          every evaluation, appended and fsync'ed (see journal.py)
  proposals/NNNNNN.yaml  each proposal as a mergekit YAML, written before it is evaluated
  recipe.yaml            the recipe as the latest session read it
  search.json            CMA-ES's state after the latest generation (a check on the replay)
  winner.yaml            the winner the selection chose (see selection.py), as a mergekit YAML
  report.json, report.md, *.png   the report (see report.py)
  merged/                the winner merged to disk by mergekit, with mergekit_config.yml
"""

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence

from mergekit_recycle import constants
from mergekit_recycle.baselines import baseline_merges
from mergekit_recycle.candidate import SPLITS, CandidateEvaluator, Split
from mergekit_recycle.config_files import write_atomically
from mergekit_recycle.errors import (ConfigFileError, FinalMergeError, HubStateError, PoolError, RecycleError,
                                     RunDirError, SearchAbortedError, one_line, shorten)
from mergekit_recycle.hub import PICKLE_FILE
from mergekit_recycle.journal import JOURNAL, Journal, now, writing
from mergekit_recycle.mergekit_yaml import write_merge_config
from mergekit_recycle.pool import Pool, resolve_pool
from mergekit_recycle.proposal import Merge, SearchSpace
from mergekit_recycle.recipe import Recipe
from mergekit_recycle.search import CMAES
from mergekit_recycle.selection import Contender, Decision, choose

if TYPE_CHECKING:
    from mergekit_recycle.hub_state import HubState

Record = Dict[str, Any]
SAMPLE_BYTES = 2**20
# The recipe as the latest session was given it: what `publish` cards and pushes.
RECIPE_COPY = "recipe.yaml"
# CMA-ES's state after the latest generation: what a replay of the journal must reach again.
SEARCH_STATE = "search.json"
# The winner as a mergekit YAML.
WINNER = "winner.yaml"
# The kinds of the selection's finalists (the others are baselines).
FINALIST_KINDS = ("proposal", "greedy-step", "mean")
# Writing the winner to disk reads its checkpoints and writes one; assume at least this rate.
DISK_BYTES_PER_SECOND = 200 * 2**20
# A disk that takes no more (full, read-only, over quota), as Python ([Errno 28]) and the Rust of
# safetensors (os error 28) word it; other OS errors (a checkpoint gone) are not about writing.
DISK_FULL = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
DISK_ERROR = re.compile(r"No space left|Read-only file system|Disk quota|(\[Errno |os error )(%s)\b"
                        % "|".join(str(code) for code in DISK_FULL))


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe."""

    run_dir: Path
    budget: int
    seed: int
    device: str
    time_budget: Optional[float] = None  # seconds, counted from `started`
    restart: bool = False
    in_memory: Optional[bool] = None  # None: keep the pool in memory when it fits
    batch_size: int = constants.DEFAULT_BATCH_SIZE
    started: Optional[float] = None  # time.monotonic() when the command started; None: when optimize() is called
    budget_is_increment: bool = False  # budget counts the evaluations to add to the run's, not the run's total


class OutOfTime(Exception):
    """The time budget leaves no room for another evaluation."""


def fingerprint(recipe: Recipe, pool: Pool, absolute_paths: bool = False) -> Dict[str, str]:
    """Hashes of what a run's results depend on, part by part, so a changed recipe can be named."""

    def files(path: Path) -> List[Any]:
        # What identifies a checkpoint's files without reading tens of GB on every start: each
        # JSON file whole, and of each weight file its size and its first and last MiB (its
        # safetensors header and a sample of its tensors). Copying or touching leaves it alike.
        identity = []
        listing = sorted(path.iterdir())
        # The weights merged: safetensors, else allowed pickles (never a trainer's training_args.bin).
        weights = [f for f in listing if f.suffix == ".safetensors"] or [f for f in listing if PICKLE_FILE.match(f.name)]
        for file in listing:
            if file.suffix == ".json":
                identity.append([file.name, hashlib.sha256(file.read_bytes()).hexdigest()])
            elif file in weights:
                size = file.stat().st_size
                with open(file, "rb") as handle:
                    head = handle.read(SAMPLE_BYTES)
                    handle.seek(max(size - SAMPLE_BYTES, 0))
                    tail = handle.read(SAMPLE_BYTES)
                identity.append([file.name, size, hashlib.sha256(head + tail).hexdigest()])
        return identity

    def where(path: Path) -> str:
        # Relative to the recipe, so that a checkout elsewhere (another runner, another laptop)
        # continues the same run; version 1 journals recorded absolute paths.
        return str(path) if absolute_paths else os.path.relpath(path, pool.source.parent)

    parts = {
        # A Hub checkpoint's commit SHA names its content already: its files need not be read.
        "pool": [[c.name, c.source if c.sha else where(c.path), files(c.path) if c.sha is None else None]
                 for c in pool.inputs] + [pool.base.name if pool.base else None],
        "tasks": [task.model_dump(mode="json") for task in recipe.tasks] + [[where(p) for p in recipe.task_paths]],
        "search": _search_settings(recipe),
        # Only the holdback changes what the search sees; finalists and confidence only choose among what was
        # scored, so a finished run can be decided again with other settings without searching again.
        "selection": {"holdback": recipe.selection.holdback},
        "merge": recipe.merge.dtype,
    }
    return {name: _digest(value) for name, value in parts.items()}


def _digest(value: Any) -> str:
    """A fingerprint part: a short hash of its JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _search_settings(recipe: Recipe) -> Record:
    """What of the search settings a run's results depend on (the budget only says how far to go)."""
    return recipe.search.model_dump(mode="json", exclude={"budget"})


def _with_seed(recipe: Recipe, seed: int) -> Recipe:
    return recipe.model_copy(update={"search": recipe.search.model_copy(update={"seed": seed})})


@contextlib.contextmanager
def locked(run_dir: Path, discard: bool = False) -> Iterator[None]:
    """Hold RUN_DIR for this process: two runs appending to one journal would corrupt it.

    With `discard`, a folder this call created is removed again when what runs inside fails before
    anything was evaluated: a start refused on a typo leaves nothing for the fixed rerun to trip on.
    """
    try:
        run_dir.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise RunDirError(run_dir, f"cannot be created: {exc.strerror or exc}; choose another --run-dir "
                          "(or output.run_dir)") from None
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(run_dir, "another mergekit-recycle optimize is running on this folder; "
                              "wait for it, or give this run another --run-dir") from None
        try:
            yield
        except BaseException:
            if discard and created and not _holds_evaluations(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)  # still locked: no other run can have begun in it
            raise


def _holds_evaluations(run_dir: Path) -> bool:
    """Whether the run folder's journal records an evaluation; a journal that cannot be read counts as
    holding some, so that a failed start never deletes what it cannot see."""
    journal = run_dir / JOURNAL
    try:
        return journal.is_file() and bool(Journal(journal, repair=False).of_type("evaluation"))
    except Exception:  # noqa: BLE001 - the user's original error is the one to report
        return True


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run out of the way (for --restart): nothing computed is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    os.replace(run_dir, target)
    return target


class Run:
    """One search, applied to a run folder; each method is a stage of the plan."""

    def __init__(self, recipe: Recipe, source: Path, pool: Pool, options: RunOptions, journal: Journal,
                 evaluator: CandidateEvaluator, say: Callable[[str], None], progress: bool,
                 saved: Callable[..., None] = lambda final=False: None):
        self.recipe = recipe
        self.source = source
        self.pool = pool
        self.options = options
        self.journal = journal
        self.evaluator = evaluator
        self.say = _beside_bars(say) if progress and sys.stderr.isatty() else say
        self.progress = progress
        self.saved = saved  # called whenever the journal has grown by a stage or a generation
        self.saved_at = len(journal.records)
        self.recorded_state = read_search_state(options.run_dir)
        self.started = options.started if options.started is not None else time.monotonic()
        self.failures_in_a_row = 0
        # Earlier sessions' timings, so that a resumed run plans its time budget from the start.
        self.durations: Dict[str, List[float]] = {split: [] for split in SPLITS}
        # Indexes of the journal, kept up to date by _append, so that no evaluation scans it.
        self.by_name: Dict[tuple, Record] = {}  # (kind, name, split) -> its latest record
        self.by_merge: Dict[tuple, Record] = {}  # (merge key, split) -> the first record that scored it
        self.best = float("nan")  # the best search objective so far
        for record in journal.of_type("evaluation"):
            self._index(record)
            if record["status"] == "ok" and record["reused"] is None:
                self.durations[record["split"]].append(record["merge_seconds"] + record["eval_seconds"])
        search = recipe.search
        self.space = SearchSpace(pool.names, scale=search.scale if not search.scale_is_searched else 1.0,
                                 scale_range=search.scale if search.scale_is_searched else None)
        self.proposals_dir = options.run_dir / "proposals"
        self.cma: Optional[CMAES] = None
        self.baseline_kinds: Dict[str, str] = {}  # name -> kind, once the baselines are scored

    # -- evaluating, with the journal as cache ------------------------------------------------

    def _index(self, record: Record) -> None:
        self.by_name[(record["kind"], record["name"], record["split"])] = record
        if record["status"] == "ok":
            self.by_merge.setdefault((tuple(record["key"]), record["split"]), record)
            if record["split"] == "search" and not record["objective"] <= self.best:
                self.best = record["objective"]

    def _append(self, record: Record) -> Record:
        self.journal.append(record)
        self._index(record)
        return record

    def _find(self, merge: Merge, split: Split) -> Optional[Record]:
        return self.by_merge.get((merge.key, split))

    def _estimate(self, split: Split) -> float:
        recent = self.durations[split][-5:]
        return sum(recent) / len(recent) if recent else 0.0

    def _check_time(self, split: Split) -> None:
        if self.options.time_budget is None:
            return
        # Leave room to score the winner on the holdout tasks and to write it to disk.
        writing = self.pool.layout.nbytes * (len(self.pool.inputs) + 1) / DISK_BYTES_PER_SECOND
        reserve = self._estimate("holdout") + writing + max(5.0, 0.02 * self.options.time_budget)
        selection = self.recipe.selection
        if selection.enabled:  # every baseline and every finalist is scored on the held-back documents
            each = self._estimate("selection") or self._estimate("search") * selection.holdback / (1 - selection.holdback)
            reserve += each * (len(self.pool.names) + 2 + selection.finalists + 1)
        if time.monotonic() - self.started + self._estimate(split) + reserve > self.options.time_budget:
            raise OutOfTime

    def evaluate(self, merge: Merge, split: Split, kind: str, name: str, timed: bool = True, **extra: Any) -> Record:
        """The journal record of `merge` on `split`: an earlier one when this merge was scored before.

        A `timed` evaluation raises OutOfTime when the time budget has no room for it.
        """
        replayed = self.by_name.get((kind, name, split))
        # Replayed from the journal; a failed baseline is tried again (the cause may be fixed),
        # while a failed proposal keeps its failure: the search's replay depends on it.
        if replayed is not None and (replayed["status"] == "ok" or kind == "proposal"):
            return replayed
        record = {"type": "evaluation", "split": split, "kind": kind, "name": name, **extra,
                  "weights": merge.weights, "scale": merge.scale, "key": list(merge.key)}
        earlier = self._find(merge, split)
        if earlier is not None:
            record.update(status="ok", scores=earlier["scores"], objective=earlier["objective"], error=None,
                          merge_seconds=0.0, eval_seconds=0.0, reused=earlier["name"], time=now())
            if "documents" in earlier:
                record["documents"] = earlier["documents"]
            return self._append(record)
        if timed:
            self._check_time(split)
        record.update(self._score(merge, split), reused=None, time=now())
        self._append(record)
        self._count_failure(record)
        return record

    def _evaluate_saying(self, label: Optional[str], merge: Merge, split: Split, kind: str, name: str,
                         **extra: Any) -> Record:
        """evaluate(), saying `label`'s score when it was scored now rather than replayed from the journal."""
        known = len(self.journal.records)
        record = self.evaluate(merge, split, kind, name, **extra)
        if label and len(self.journal.records) > known and record["status"] == "ok":
            self.say(f"{label}: {split} objective {record['objective']:.4f}")
        return record

    def _score(self, merge: Merge, split: Split) -> Record:
        started = time.perf_counter()
        try:
            evaluation = self.evaluator.evaluate(merge, split)
        except (ConfigFileError, PoolError, KeyboardInterrupt):
            raise  # a wrong recipe or a bad checkpoint fails every candidate alike: stop at once
        except Exception as exc:  # noqa: BLE001 - a failed candidate must not end the search
            error = one_line(f"{type(exc).__name__}: {exc}")
            return {"status": "failed", "scores": None, "objective": None, "error": error,
                    "merge_seconds": None, "eval_seconds": round(time.perf_counter() - started, 4)}
        self.durations[split].append(evaluation.merge_seconds + evaluation.eval_seconds)
        values = list(evaluation.scores.values()) + [evaluation.objective]
        if not all(math.isfinite(value) for value in values):
            return {"status": "failed", "scores": None, "objective": None, "error": f"scored NaN: {evaluation.scores}",
                    "merge_seconds": round(evaluation.merge_seconds, 4), "eval_seconds": round(evaluation.eval_seconds, 4)}
        record = {"status": "ok", "scores": evaluation.scores, "objective": evaluation.objective, "error": None,
                  "merge_seconds": round(evaluation.merge_seconds, 4), "eval_seconds": round(evaluation.eval_seconds, 4)}
        if evaluation.documents is not None:  # compact: 0/1 accuracies as integers
            record["documents"] = {task: [int(v) if v.is_integer() else round(v, 6) for v in values]
                                   for task, values in evaluation.documents.items()}
        return record

    def _count_failure(self, record: Record) -> None:
        if record["status"] == "ok":
            self.failures_in_a_row = 0
            return
        self.say(f"{record['name']} failed: {record['error']}")
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= constants.MAX_CONSECUTIVE_FAILURES:
            raise SearchAbortedError(self.options.run_dir, self.failures_in_a_row, record["error"])

    # -- the stages -------------------------------------------------------------------------

    def baselines(self) -> Dict[str, Merge]:
        """Score every baseline on the search tasks, then on the holdout tasks (outside the budget)."""
        count = len(self.pool.names)
        # Each checkpoint, the uniform soup, at most count - 1 greedy steps and the greedy soup.
        with self._progress("baselines, search tasks", 2 * count + 1) as bar:

            def search_objective(merge: Merge, kind: str, name: str) -> Optional[float]:
                # A greedy step is said by greedy_soup, with whether it was kept.
                record = self._evaluate_saying(f"baseline {name}" if kind != "greedy-step" else None,
                                               merge, "search", kind, name)
                bar(1)
                return record["objective"]

            merges = baseline_merges(self.pool.names, search_objective, self.say)
            self.evaluate(merges["greedy soup"][1], "search", "greedy", "greedy soup")
            bar(1)
        with self._progress("baselines, holdout tasks", len(merges)) as bar:
            for name, (kind, merge) in merges.items():
                self._evaluate_saying(f"baseline {name}", merge, "holdout", kind, name)
                bar(1)
        self.save()
        self.baseline_kinds = {name: kind for name, (kind, merge) in merges.items()}
        return {name: merge for name, (kind, merge) in merges.items()}

    def search(self, baselines: Dict[str, Merge]) -> None:
        """CMA-ES until the budget is spent: from the best baseline, with the soups injected."""
        start = self._search_start(baselines)
        cma = CMAES(start["x0"], self.recipe.search.sigma0, seed=self.options.seed,
                    population=self.recipe.search.population, inject=start["inject"])
        self.cma = cma  # where the search stands: its mean is a finalist of the selection
        failed_fitness = start["failed_fitness"]
        recorded = {record["id"]: record for record in self.journal.of_type("evaluation") if record["kind"] == "proposal"}
        evaluations = self._evaluations()
        # No bar when the budget is spent already: tqdm would show a count past its total as "200/None".
        bar = self._progress_bar(evaluations) if evaluations < self.options.budget else None
        next_id = 0
        try:
            # Every journaled generation is replayed, even with no budget left: the selection starts from
            # the state the search ended in (its mean is a finalist), whichever session asks.
            while evaluations < self.options.budget or next_id in recorded:
                points, fitnesses = cma.ask(), []
                for point in points:
                    proposal_id, next_id = next_id, next_id + 1
                    record = recorded.get(proposal_id)
                    if record is not None and not _close(record["coordinates"], point):
                        raise RunDirError(self.options.run_dir, f"{JOURNAL}: proposal {proposal_id} does not match what "
                                          "this search proposes; the journal comes from another version or was edited: "
                                          "rerun with --restart")
                    if record is None:
                        if evaluations >= self.options.budget:
                            return
                        record = self._propose(point, proposal_id, cma.generation)
                        if record["reused"] is None:
                            evaluations += 1
                            if bar:
                                bar.set_postfix_str(f"best {self.best:.4f}", refresh=False)
                                bar.update(1)
                    fitnesses.append(-record["objective"] if record["status"] == "ok" else failed_fitness)
                cma.tell(points, fitnesses)
                self._check_replay(cma)
                self.save(cma)
        finally:
            if bar:
                bar.close()

    def save(self, cma: Optional[CMAES] = None, final: bool = False) -> None:
        """After a stage or a generation that added to the journal: write search.json, then call `saved`."""
        if len(self.journal.records) == self.saved_at and not final:
            return  # replayed: nothing new
        if cma is not None:
            with writing(self.options.run_dir / SEARCH_STATE, self.options.run_dir):
                write_atomically(self.options.run_dir / SEARCH_STATE, json.dumps(
                    {**cma.state(), "evaluations": self._evaluations(), "records": len(self.journal.records)}, indent=1))
        self.saved_at = len(self.journal.records)
        self.saved(final=final)

    def _evaluations(self) -> int:
        return proposals_evaluated(self.journal.records)

    def _check_replay(self, cma: CMAES) -> None:
        """A replay that reaches the generation search.json recorded must reach its state too: CMA-ES
        rebuilt by another cma (or numpy) than the run's would otherwise go on from somewhere else."""
        recorded = self.recorded_state
        if not recorded or recorded["generation"] != cma.generation:
            return
        state = cma.state()
        if state["restarts"] != recorded["restarts"] or not _close([state["sigma"], *state["mean"]],
                                                                   [recorded["sigma"], *recorded["mean"]]):
            raise RunDirError(self.options.run_dir, f"{SEARCH_STATE}: replaying the journal reaches another CMA-ES "
                              f"state at generation {cma.generation} (sigma {state['sigma']:.6g}, recorded "
                              f"{recorded['sigma']:.6g}); the run was searched with cma {recorded['cma']}, this is cma "
                              f"{state['cma']}: install cma=={recorded['cma']}, or rerun with --restart")

    def _search_start(self, baselines: Dict[str, Merge]) -> Record:
        """Where CMA-ES starts and what it is shown first, journaled once: a resumed run replays
        the search from the same start even if a baseline that had failed scores now."""
        recorded = self.journal.of_type("search")
        if recorded:
            return recorded[0]
        objectives = {name: record["objective"] for name, merge in baselines.items()
                      if (record := self._find(merge, "search")) is not None}
        singles = [name for name in self.pool.names if name in objectives]
        # The search starts from the best of these and is shown the others (pycma's inject).
        seeds = ([max(singles, key=objectives.get)] if singles else []) + [
            name for name in ("uniform soup", "greedy soup") if name in objectives]
        start = max(seeds, key=objectives.get) if seeds else "uniform soup"
        injected = [name for name in seeds if name != start and baselines[name] != baselines[start]]
        record = {"type": "search", "start": start, "injected": injected,
                  "x0": self._start_point(baselines[start]),
                  "inject": [self._start_point(baselines[name]) for name in injected],
                  # Below every real candidate: the objective of a failed one counts as the worst baseline's minus 1.
                  "failed_fitness": 1.0 - min(objectives.values(), default=0.0)}
        self.journal.append(record)
        return record

    def _start_point(self, baseline: Merge) -> List[float]:
        """A baseline's coordinates, at the scale the search starts from (baselines have scale 1)."""
        return self.space.coordinates(baseline.model_copy(update={"scale": self.space.start_scale()}))

    def _propose(self, point: List[float], proposal_id: int, generation: int) -> Record:
        merge = self.space.merge(point)
        name = f"{proposal_id:06d}"
        path = self.proposals_dir / f"{name}.yaml"
        with writing(path, self.options.run_dir):
            write_merge_config(path, merge, self.pool, self.recipe.merge.dtype,
                               f"proposal {name} (generation {generation}) of {self.recipe.name}")
        return self.evaluate(merge, "search", "proposal", f"proposal {name}", id=proposal_id, generation=generation,
                             coordinates=point)

    def _progress_bar(self, done: int, desc: str = "search", total: Optional[int] = None):
        """A tqdm bar on stderr (None without progress): the search's, or a stage's of `total` evaluations."""
        if not self.progress:
            return None
        from tqdm import tqdm

        # In a log file (CI, `make demo | tee`) every redraw is a line: redraw every 30 s there, and show a
        # stage's bar only once it has taken that long (its lines say what it does meanwhile).
        interactive = sys.stderr.isatty()
        return tqdm(total=self.options.budget if total is None else total, initial=done, desc=desc, unit="eval",
                    dynamic_ncols=True, mininterval=0.1 if interactive else 30.0,
                    delay=0.0 if interactive or total is None else 30.0,
                    bar_format="{desc}: {n}/{total} evaluations |{bar}| [{elapsed}<{remaining}{postfix}]")

    @contextlib.contextmanager
    def _progress(self, desc: str, total: int) -> Iterator[Callable[[int], None]]:
        """A stage's bar, as a function that advances it: the baselines and the selection take minutes on
        a real pool, and are shown as the search is. Replayed evaluations count too (they are instant)."""
        bar = self._progress_bar(0, desc, total)
        try:
            yield (lambda steps: bar.update(steps)) if bar else (lambda steps: None)
            if bar:
                bar.total = bar.n  # done: the greedy soup may have taken fewer steps than planned
        finally:
            if bar:
                bar.close()

    def select(self, baselines: Dict[str, Merge]) -> Optional[Record]:
        """Choose the winner (see selection.py) and journal the decision; None when nothing was scored."""
        from mergekit_recycle.report import winner_record

        settings = self.recipe.selection
        if not settings.enabled or not baselines:
            best = winner_record(self.journal.records)
            if best is None:
                return None
            why = ("the time budget ran out during the baselines: the best merge on the search tasks wins" if settings.enabled
                   else "holdback 0: the best merge on the search tasks wins, with no held-back check")
            decision = Decision(best["name"], best["kind"], best["name"], None, None, None, None, why)
            return self._decided(decision, Merge(weights=best["weights"], scale=best["scale"]))
        contenders = self._contenders(baselines)
        if not contenders:
            return None
        finalists = [c for c, _ in contenders.values() if c.kind in FINALIST_KINDS]
        decision = choose([c for c, _ in contenders.values() if c.kind not in FINALIST_KINDS], finalists,
                          self.recipe.shares(), settings.holdback, settings.confidence)
        self.say(f"selection: {decision.reason}")
        return self._decided(decision, contenders[decision.winner][1], finalists=[c.name for c in finalists])

    def _finalists(self, baselines: Dict[str, Merge]) -> Dict[str, tuple]:
        """name -> (kind, merge): the best distinct merges by search objective (proposals, and the greedy soup's
        intermediate soups, so that the merge the search alone would pick is always among them), and the CMA-ES mean."""
        scored = [r for r in self.journal.of_type("evaluation") if r["kind"] in ("proposal", "greedy-step")
                  and r["split"] == "search" and r["status"] == "ok"]
        order = sorted(range(len(scored)), key=lambda i: (-scored[i]["objective"], i))  # of equals, the earliest
        seen = {merge.key for merge in baselines.values()}  # a baseline is a contender already
        finalists: Dict[str, tuple] = {}
        for record in (scored[i] for i in order):
            if len(finalists) == self.recipe.selection.finalists:
                break
            if tuple(record["key"]) not in seen:
                seen.add(tuple(record["key"]))
                finalists[record["name"]] = (record["kind"], Merge(weights=record["weights"], scale=record["scale"]))
        if self.cma is not None:
            mean = self.space.merge(self.cma.mean)
            if mean.key not in seen:
                # Named by the evaluations it follows: a run continued with a larger budget has another mean.
                name = f"CMA-ES mean @{self._evaluations()}"
                self.evaluate(mean, "search", "mean", name, timed=False)  # for the report: it never chooses
                finalists[name] = ("mean", mean)
        return finalists

    def _contenders(self, baselines: Dict[str, Merge]) -> Dict[str, tuple]:
        """name -> (Contender, Merge): every baseline and every finalist, scored on the held-back documents."""
        entries = [(name, self.baseline_kinds[name], merge) for name, merge in baselines.items()]
        entries += [(name, kind, merge) for name, (kind, merge) in self._finalists(baselines).items()]
        contenders: Dict[str, tuple] = {}
        with self._progress("selection, held-back documents", len(entries)) as bar:
            for name, kind, merge in entries:
                searched = self._find(merge, "search")
                record = self.evaluate(merge, "selection", "finalist" if kind in FINALIST_KINDS else kind, name,
                                       timed=False)
                bar(1)
                if record["status"] != "ok" or searched is None:
                    continue  # a merge that failed to score cannot win
                contenders[name] = (Contender(name, kind, searched["objective"], record["objective"],
                                              record.get("documents")), merge)
        return contenders

    def _decided(self, decision: Decision, merge: Merge, finalists: Sequence[str] = ()) -> Record:
        """Journal the decision: every session that finishes records the one its report shows."""
        record = {"type": "selection", "time": now(), "evaluations": self._evaluations(), **decision.record(),
                  "finalists": list(finalists), "holdback": self.recipe.selection.holdback,
                  "confidence": self.recipe.selection.confidence,
                  "weights": merge.weights, "scale": merge.scale, "key": list(merge.key)}
        self.journal.append(record)
        return record

    def finish(self, baselines: Dict[str, Merge]) -> Optional[Merge]:
        """Choose the winner, score it on the holdout tasks and write it as a mergekit YAML; None if nothing scored."""
        selected = self.select(baselines)
        if selected is None:
            return None
        merge = Merge(weights=selected["weights"], scale=selected["scale"])
        # Untimed: the time budget reserved room for it.
        self._evaluate_saying(f"winner {selected['winner']}", merge, "holdout", "optimized", selected["winner"], timed=False)
        with writing(self.options.run_dir / WINNER, self.options.run_dir):
            write_merge_config(self.options.run_dir / WINNER, merge, self.pool, self.recipe.merge.dtype,
                               f"the winner of {self.recipe.name}: {selected['winner']} ({selected['reason']})")
        return merge


def _beside_bars(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, moving any progress bar out of the way of the line (tqdm redraws it below)."""
    from tqdm import tqdm

    def said(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            say(line)

    return said


def proposals_evaluated(records: List[Record]) -> int:
    """Proposals the search evaluated (not reused): what --budget counts."""
    return len({r["id"] for r in records if r.get("type") == "evaluation" and r["kind"] == "proposal" and r["reused"] is None})


def read_search_state(run_dir: Path) -> Optional[Record]:
    """search.json: CMA-ES's state after the last generation journaled (None before the first)."""
    path = run_dir / SEARCH_STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise RunDirError(run_dir, f"{SEARCH_STATE} is not JSON: delete it (the journal alone resumes the run)") from None


def _close(a: List[float], b: List[float]) -> bool:
    """The same point, up to the last bits another CPU's BLAS may round differently."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-7, abs_tol=1e-9) for x, y in zip(a, b))


def open_journal(recipe: Recipe, pool: Pool, options: RunOptions, recipe_seed: Optional[int] = None,
                 say: Callable[[str], None] = lambda line: None) -> Journal:
    """The run folder's journal; refused when it holds a run of another recipe that has evaluated something.

    `recipe_seed` is the recipe file's search.seed (`recipe` carries the command's --seed): with it, a
    journal from before runs recorded their seed can still tell a seed that differs from the run's.
    """
    journal = Journal(options.run_dir / JOURNAL)
    runs = journal.of_type("run")
    if runs:
        prints = fingerprint(recipe, pool, absolute_paths=runs[0].get("version") == 1)
        earlier = runs[0].get("fingerprint") or {}
        # Runs from before winner selection chose by the search objective alone: `holdback: 0` continues them.
        legacy = "selection" not in earlier and not recipe.selection.enabled
        changed = [part for part in prints if prints[part] != earlier.get(part) and not (part == "selection" and legacy)]
        if changed and not journal.of_type("evaluation"):
            # Nothing was computed (a start that stopped on a typo, Ctrl-C, a killed first load): the fixed
            # recipe takes the run over. The sessions stay as the history of what was asked; the run record
            # is written afresh by start_session, and the other records (a finish) belonged to the old run.
            journal.rewrite(journal.of_type("session"))
            with contextlib.suppress(FileNotFoundError):
                (options.run_dir / SEARCH_STATE).unlink()
            say(f"{options.run_dir}: its earlier start evaluated nothing; this recipe ({', '.join(changed)} changed) "
                "takes the run over")
            return journal
        if changed == ["selection"] and "selection" not in earlier:
            raise RunDirError(options.run_dir, "holds a run from before winner selection, which searched every "
                              "document of the search tasks; continue it with `selection: {holdback: 0}` in the recipe, "
                              "or rerun with --restart to start over with part of them held back")
        seed = _seed_of_run(runs[0], recipe, [recipe_seed] if recipe_seed is not None else []) if changed == ["search"] else None
        if seed is not None:
            how = (f"drop --seed (the recipe's search.seed is {seed})" if recipe_seed == seed
                   else f"give --seed {seed}")
            raise RunDirError(options.run_dir, f"holds a run searched with seed {seed}, and this command asks for seed "
                              f"{recipe.search.seed}: to continue the run, {how}; to start over with seed "
                              f"{recipe.search.seed}, rerun with --restart (the earlier run is set aside), or choose "
                              "another --run-dir")
        if changed:
            raise RunDirError(options.run_dir, f"holds a run of a different recipe ({', '.join(changed)} changed); "
                              "rerun with --restart to set it aside and start over, or choose another --run-dir")
    return journal


def _seed_of_run(run: Record, recipe: Recipe, seeds: Sequence[int]) -> Optional[int]:
    """The seed `run` searched with, when the seed is all that tells its search settings from `recipe`'s.

    Runs record their seed; for an older run, each of `seeds` is tried against its fingerprint.
    """
    earlier = (run.get("fingerprint") or {}).get("search")
    for seed in ([run["seed"]] if "seed" in run else seeds):
        if seed != recipe.search.seed and _digest(_search_settings(_with_seed(recipe, seed))) == earlier:
            return seed
    return None


def run_identity(recipe: Recipe, pool: Pool) -> Record:
    """The part of the `run` record that names this machine's checkpoints (and the entries they came from)."""
    entries = {f"pool[{i}]": entry for i, entry in enumerate(recipe.pool)}
    if recipe.base is not None:
        entries["base"] = recipe.base
    return {"checkpoints": [c.model_dump(mode="json") for c in pool.checkpoints],
            "base": pool.base.model_dump(mode="json") if pool.base else None,
            # The entries the checkpoints were resolved from: their Hub pins hold while an entry is unchanged.
            "entries": {location: entry.model_dump(mode="json") for location, entry in entries.items()}}


def start_session(journal: Journal, recipe: Recipe, pool: Pool, options: RunOptions, recipe_text: str) -> None:
    """Journal what this run is (once, when it first gets going) and what this session was asked."""
    if not journal.of_type("run"):
        run = {
            "type": "run", "version": 2, "recipe": recipe.name, "fingerprint": fingerprint(recipe, pool),
            "started": now(), "seed": recipe.search.seed, **run_identity(recipe, pool),
            "tasks": [{"name": t.name, "search": t.search, "holdout": t.holdout, "metric": t.metric, "weight": t.weight}
                      for t in recipe.tasks],
        }
        # The run record comes first; a run taken over by a fixed recipe keeps its earlier sessions after it.
        if journal.records:
            journal.rewrite([run, *journal.records])
        else:
            journal.append(run)
    journal.append({"type": "session", "started": now(), "budget": options.budget, "seed": options.seed,
                    "time_budget": options.time_budget, "device": options.device})
    with writing(options.run_dir / RECIPE_COPY, options.run_dir):
        write_atomically(options.run_dir / RECIPE_COPY, recipe_text)


def earlier_pins(options: RunOptions, hub_state: Optional["HubState"] = None) -> Dict[str, Any]:
    """The Hub pins of the run in options.run_dir, else of the run kept on the Hub (none for a new run or --restart)."""
    from mergekit_recycle.hub_pool import pins_from_run

    path = options.run_dir / JOURNAL
    if options.restart:
        return {}
    runs = Journal(path, repair=False).of_type("run") if os.path.isfile(path) else []
    if not runs and hub_state is not None:
        runs = [record for record in hub_state.records if record.get("type") == "run"]
    return pins_from_run(runs[0] if runs else None)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that cannot be one, naming the part of its path at fault: a file where a folder
    must be, a name longer than the file system allows. Checked before anything is read or written."""
    ancestor = run_dir
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    what = "a link to nothing" if ancestor.is_symlink() and not ancestor.exists() else "a file"
    if ancestor == run_dir and not run_dir.is_dir():
        raise RunDirError(run_dir, f"is {what}, not a run folder: choose another --run-dir (or output.run_dir)")
    if not ancestor.is_dir():
        raise RunDirError(run_dir, f"cannot be created: {ancestor} is {what}, not a folder; choose another "
                          "--run-dir (or output.run_dir)")
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except OSError as exc:
        raise RunDirError(run_dir, f"cannot be used: {ancestor}: {exc.strerror or exc}; choose another --run-dir "
                          "(or output.run_dir)") from None
    for name in run_dir.relative_to(ancestor).parts:
        if len(os.fsencode(name)) > limit:
            raise RunDirError(Path(shorten(str(run_dir), 120)), f"the folder name {shorten(name)!r} is "
                              f"{len(os.fsencode(name))} bytes long, and the file system allows {limit}: choose a "
                              "shorter --run-dir (or output.run_dir)")


def prepare_run_dir(options: RunOptions, say: Callable[[str], None]) -> None:
    """Check the run folder's path and, for --restart, set an earlier run aside."""
    check_run_dir(options.run_dir)
    if options.restart and (options.run_dir / JOURNAL).exists():
        with locked(options.run_dir):  # never move a run that another process is writing
            aside = set_aside(options.run_dir)
        say(f"--restart: the earlier run was moved to {aside}")


def optimize(recipe: Recipe, source: Path, options: RunOptions, say: Callable[[str], None] = lambda line: None,
             progress: bool = False, evaluator: Optional[Callable[..., CandidateEvaluator]] = None,
             hub_state: Optional["HubState"] = None) -> Dict[str, Any]:
    """Run (or continue) the search of `recipe` in options.run_dir; return the report.

    `evaluator` builds the CandidateEvaluator from (recipe, pool, device, source); the
    default merges into one resident model in this process. With `hub_state`, the run
    continues the search kept on the Hub, and commits the journal there after every
    stage and generation (see hub_state.py).
    """
    from mergekit_recycle.candidate import ResidentEvaluator
    from mergekit_recycle.report import build_report, write_report
    from mergekit_recycle.resident_merge import resolve_device

    recipe_seed = recipe.search.seed
    recipe = recipe.model_copy(update={"search": recipe.search.model_copy(update={"seed": options.seed,
                                                                                   "budget": options.budget})})
    check_run_dir(options.run_dir)
    device = resolve_device(options.device)  # before the run folder is made: a refused device leaves none behind
    pool = resolve_pool(recipe, source, pins=earlier_pins(options, hub_state))
    prepare_run_dir(options, say)
    with locked(options.run_dir, discard=True):
        if hub_state is not None and not options.restart:
            hub_state.adopt(options.run_dir, run_identity(recipe, pool), say)
        journal = open_journal(recipe, pool, options, recipe_seed, say)
        done = proposals_evaluated(journal.records)
        if options.budget_is_increment:
            options = dataclasses.replace(options, budget=done + options.budget, budget_is_increment=False)
        elif done and done >= options.budget:
            say(f"the run already has {done} evaluations (budget {options.budget}): nothing more to search; "
                "--budget +N searches N more")
        say(f"pool: {len(pool.checkpoints)} checkpoints ({', '.join(pool.names)}), device {device}")
        build = evaluator or (lambda *args: ResidentEvaluator(*args, in_memory=options.in_memory,
                                                              batch_size=options.batch_size))
        candidate_evaluator = build(recipe, pool, device, source)
        if hasattr(candidate_evaluator, "describe"):
            say(candidate_evaluator.describe())
        # Only now, once the pool loaded: a run that could not start leaves no record to be refused by.
        start_session(journal, recipe, pool, options, source.read_text(encoding="utf-8"))
        saved = ((lambda final=False: hub_state.save(options.run_dir, say, final=final)) if hub_state is not None
                 else (lambda final=False: None))
        run = Run(recipe, source, pool, options, journal, candidate_evaluator, say, progress, saved)
        stopped_early = False
        baselines: Dict[str, Merge] = {}
        try:
            baselines = run.baselines()
            run.search(baselines)
        except OutOfTime:
            stopped_early = True
            say("time budget reached: stopping the search, writing the report for what was evaluated")
        except SearchAbortedError:
            write_report(options.run_dir, build_report(journal.records), journal.records)
            with contextlib.suppress(HubStateError):  # the run folder keeps it; the abort is the news
                run.save(final=True)
            raise
        winner = run.finish(baselines)
        journal.append({"type": "finish", "time": now(), "stopped_early": stopped_early})
        report = build_report(journal.records)
        write_report(options.run_dir, report, journal.records)
        # A run kept on the Hub merges its winner only to publish it (hub_state.conclude): a night that
        # does not beat the published model skips writing the pool's worth of weights.
        if winner is not None and hub_state is None:
            merge_winner(options.run_dir, device, trust_remote_code=recipe.merge.trust_remote_code)
        return report


def merge_winner(run_dir: Path, device: str, trust_remote_code: bool = False) -> Path:
    """Merge winner.yaml to RUN_DIR/merged with mergekit (lazy loading; CUDA when the run uses a GPU).

    A merge that fails leaves no merged.partial/ behind, journals the failure (the report is then not
    finished) and raises FinalMergeError, one line naming the architecture and the tensor.
    """
    from mergekit.options import MergeOptions
    from transformers.utils import logging as transformers_logging

    from mergekit_recycle.merge import merge_yaml

    target, partial = run_dir / "merged", run_dir / "merged.partial"
    config = (run_dir / WINNER).read_text(encoding="utf-8")
    written = target / "mergekit_config.yml"
    if written.is_file() and written.read_text(encoding="utf-8") == config:
        return target  # this winner is on disk already
    shutil.rmtree(partial, ignore_errors=True)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # mergekit's own deprecation warnings are not our user's business
    try:
        merge_yaml(run_dir / WINNER, partial,
                   MergeOptions(cuda=device.startswith("cuda"), lazy_unpickle=True, copy_tokenizer=True, quiet=True,
                                trust_remote_code=trust_remote_code),
                   name=_recipe_name(run_dir))
    except RecycleError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - mergekit and torch raise many kinds; each ends as one line
        being_written = _newest_file(partial)  # where a full disk stopped the merge
        shutil.rmtree(partial, ignore_errors=True)
        raise _merge_failed(run_dir, exc, being_written) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _recipe_name(run_dir: Path) -> str:
    runs = Journal(run_dir / JOURNAL, repair=False).of_type("run")
    return runs[0]["recipe"] if runs else "merged"


def _newest_file(folder: Path) -> Optional[Path]:
    """The file last written in `folder` (None when there is none)."""
    try:
        files = [path for path in folder.iterdir() if path.is_file() or path.is_symlink()]
    except OSError:
        return None
    return max(files, key=lambda path: path.lstat().st_mtime_ns, default=None)


def _merge_failed(run_dir: Path, exc: Exception, being_written: Optional[Path] = None) -> FinalMergeError:
    """Journal a failed merge of the winner and rewrite the report (not finished); the error to raise.

    `being_written` is the file last written in merged.partial/: named when the error is the disk's.
    """
    from mergekit_recycle.architecture import read_architecture
    from mergekit_recycle.report import build_report, write_report

    reason = one_line(exc) or type(exc).__name__
    # safetensors removes the shard it failed to write, so the newest file left names it only when it
    # is not finished weights; otherwise the weights are what was being written.
    written = ("*.safetensors (the weights)" if being_written is None or being_written.suffix == ".safetensors"
               else being_written.name)
    if isinstance(exc, OSError) and exc.filename:  # Python names the file itself
        written = Path(exc.filename).name
    disk_full = (isinstance(exc, OSError) and exc.errno in DISK_FULL) or DISK_ERROR.search(reason)
    writing_file = f"writing merged/{written}: " if disk_full else ""
    named = re.search(r"[Tt]ensor ([\w.\-]+)", reason)
    tensor = named.group(1) if named else None
    journal = Journal(run_dir / JOURNAL)
    runs = journal.of_type("run")
    try:
        architecture = read_architecture(Path(runs[0]["checkpoints"][0]["path"]))
    except (OSError, ValueError, IndexError, KeyError):
        architecture = "the pool's architecture"
    error = FinalMergeError(run_dir, architecture, f"{writing_file}{type(exc).__name__}: {reason}", tensor)
    journal.append({"type": "merge_failed", "time": now(), "architecture": architecture, "tensor": tensor,
                    "error": error.reason})
    write_report(run_dir, build_report(journal.records), journal.records)
    return error
