"""The run: a recipe's plan (baselines, CMA-ES, the winner's selection, the holdout report) applied to a run folder.

`optimize` is what `mergekit-recycle optimize` calls. Everything a run learns goes to its
journal before it is used, so a run stopped at any point (Ctrl-C, SIGKILL, the time
budget, too many failures) continues where it stopped when the same command is run again:
baselines and proposals already in the journal are replayed, not evaluated again.

What the run folder holds is listed in run_folder.py.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

from mergekit_recycle import constants
from mergekit_recycle.baselines import first_baselines, greedy_soup
from mergekit_recycle.candidate import SPLITS, BatchSize, CandidateEvaluator, OneAtATime, Outcome
from mergekit_recycle.clock import Clock, OutOfTime
from mergekit_recycle.config_files import write_atomically
from mergekit_recycle.errors import (FinalMergeError, HubStateError, RecycleError, RunDirError, SearchAbortedError, one_line)
from mergekit_recycle.hub import PICKLE_FILE
from mergekit_recycle.journal import Journal, now, writing
from mergekit_recycle.ledger import Ledger
from mergekit_recycle.loglikelihoods import hardware
from mergekit_recycle.mergekit_yaml import write_merge_config
from mergekit_recycle.pool import Pool, resolve_pool
from mergekit_recycle.proposal import Merge, SearchSpace
from mergekit_recycle.recipe import Recipe
from mergekit_recycle.records import (EvaluationRecord, FinishRecord, MergeFailedRecord, RunRecord, SearchRecord,
                                      SelectionRecord, SessionRecord, Split, proposals_evaluated)
from mergekit_recycle.run_folder import (JOURNAL, MERGED, MERGED_PARTIAL, PROPOSALS, RECIPE_COPY, SEARCH_STATE, WINNER,
                                         check_run_dir, locked, read_search_state, set_aside)
from mergekit_recycle.search import CMAES
from mergekit_recycle.selection import Contender, Decision, choose

if TYPE_CHECKING:
    from mergekit_recycle.hub_state import HubState

Json = Dict[str, Any]  # a JSON object: a fingerprint's part, a run record's identity
SAMPLE_BYTES = 2**20
# The kinds of the selection's finalists (the others are baselines).
FINALIST_KINDS = ("proposal", "greedy-step", "mean")
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
    batch_size: BatchSize = constants.DEFAULT_BATCH_SIZE
    started: Optional[float] = None  # time.monotonic() when the command started; None: when optimize() is called
    budget_is_increment: bool = False  # budget counts the evaluations to add to the run's, not the run's total
    # Ray (ray_evaluator.py): used when either of the first two is given, never imported otherwise.
    workers: Optional[int] = None  # Ray workers; None with ray_address: as many as the cluster has room for
    ray_address: Optional[str] = None  # an existing cluster to join; None: a local Ray instance
    cpus_per_worker: Optional[int] = None  # CPU threads of each worker; None: the CPUs shared out

    @property
    def uses_ray(self) -> bool:
        return self.workers is not None or self.ray_address is not None


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
        # num_fewshot and apply_chat_template only where set: a run started before they existed resumes.
        "tasks": [task.fingerprint_data() for task in recipe.tasks] + [[where(p) for p in recipe.task_paths]],
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


def _search_settings(recipe: Recipe) -> Json:
    """What of the search settings a run's results depend on (the budget only says how far to go)."""
    return recipe.search.model_dump(mode="json", exclude={"budget"})


def _with_seed(recipe: Recipe, seed: int) -> Recipe:
    return recipe.model_copy(update={"search": recipe.search.model_copy(update={"seed": seed})})


@dataclass(frozen=True)
class Candidate:
    """One merge to score on one split, and the name the journal gives it."""

    merge: Merge
    kind: str
    name: str
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # a proposal's id, generation, coordinates
    label: Optional[str] = None  # said with its score when it is scored now (not replayed)


class Run:
    """One search, applied to a run folder: the loop over a ledger (the journal, indexed) and a clock (the time
    budget). Each method of the second half is a stage of the plan."""

    def __init__(self, recipe: Recipe, source: Path, pool: Pool, options: RunOptions, journal: Journal,
                 evaluator: CandidateEvaluator, say: Callable[[str], None], progress: bool,
                 saved: Callable[..., None] = lambda final=False: None):
        self.recipe = recipe
        self.source = source
        self.pool = pool
        self.options = options
        self.ledger = Ledger(journal)
        # An evaluator written before batches (evaluate() only) evaluates them one merge at a time.
        self.evaluator = evaluator if hasattr(evaluator, "evaluate_many") else OneAtATime(evaluator)
        self.say = _beside_bars(say) if progress and sys.stderr.isatty() else say
        self.said: Set[str] = set()  # the evaluators' notes said so far
        self.progress = progress
        self.saved = saved  # called whenever the journal has grown by a stage or a generation
        self.saved_at = len(journal.records)
        self.recorded_state = read_search_state(options.run_dir)
        selection = recipe.selection
        self.clock = Clock(
            options.time_budget, options.started if options.started is not None else time.monotonic(),
            {split: self.ledger.durations(split) for split in SPLITS},
            bytes_to_write=pool.layout.nbytes * (len(pool.inputs) + 1),
            # Every baseline and every finalist is scored on the held-back documents.
            finishing=(len(pool.names) + 2 + selection.finalists + 1) if selection.enabled else 0,
            holdback=selection.holdback)
        self.failures_in_a_row = 0
        search = recipe.search
        self.space = SearchSpace(pool.names, scale=search.scale if not search.scale_is_searched else 1.0,
                                 scale_range=search.scale if search.scale_is_searched else None)
        self.proposals_dir = options.run_dir / PROPOSALS
        self.cma: Optional[CMAES] = None
        self.baseline_kinds: Dict[str, str] = {}  # name -> kind, once the baselines are scored

    # -- evaluating a batch, with the journal as cache ----------------------------------------

    def evaluate(self, candidates: Sequence[Candidate], split: Split, timed: bool = True,
                 arrived: Callable[[EvaluationRecord, bool], None] = lambda record, fresh: None,
                 prepare: Callable[[List[Candidate]], None] = lambda candidates: None) -> List[EvaluationRecord]:
        """The journal record of each candidate on `split`, in order.

        A candidate journaled already is replayed (a failed baseline is tried again: its cause may be fixed;
        a failed proposal keeps its failure, the search's replay depends on it). A merge scored before under
        another name is journaled as a reuse of that score. The others are evaluated as one batch, each
        journaled as it arrives (a kill loses only what is in flight); a merge whose first copy in the batch
        failed is evaluated again after it, as a run of one merge at a time would. `arrived` is told of each
        record, and whether it is new (not replayed). A `timed` batch is cut to what the time budget has room
        for, and OutOfTime raised after it. `prepare` is given the candidates about to be journaled.
        """
        records: List[Optional[EvaluationRecord]] = [None] * len(candidates)
        for index, candidate in enumerate(candidates):
            replayed = self.ledger.named(candidate.kind, candidate.name, split)
            if replayed is not None and (replayed.ok or candidate.kind == "proposal"):
                records[index] = replayed
                arrived(replayed, False)
        end = len(candidates)  # the batch ends here: before the first candidate the time budget had no room for
        while True:
            new, first = [], set()
            for index in range(end):
                key = candidates[index].merge.key
                if records[index] is None and key not in first and self.ledger.scored(candidates[index].merge, split) is None:
                    first.add(key)
                    new.append(index)
            if not new:
                break
            cut = self._evaluate_new(candidates, new, split, timed, records, arrived, prepare)
            if cut is not None:
                end = cut
                break
        reused = []
        for index in range(end):
            if records[index] is None:
                if self.ledger.scored(candidates[index].merge, split) is None:
                    end = index  # a copy of a merge that failed, left for after the cut
                    break
                reused.append(index)
        prepare([candidates[index] for index in reused])
        for index in reused:
            candidate = candidates[index]
            records[index] = record = self.ledger.append(self._reuse(candidate, split, self.ledger.scored(candidate.merge, split)))
            if candidate.label:
                self.say(f"{candidate.label}: {split} objective {record.objective:.4f}")
            arrived(record, True)
        if end < len(candidates):
            raise OutOfTime
        return records

    def _evaluate_new(self, candidates: Sequence[Candidate], new: List[int], split: Split, timed: bool,
                      records: List[Optional[EvaluationRecord]], arrived: Callable[[EvaluationRecord, bool], None],
                      prepare: Callable[[List[Candidate]], None]) -> Optional[int]:
        """Evaluate candidates[i] for i in `new` into `records`, journaling each as it arrives and counting
        failures in a row in candidate order. The index of the first one the time budget has no room for, or None.

        Under a time budget the clock is asked before each round of as many candidates as there are workers;
        without one the whole batch goes out at once."""
        done, counted = 0, 0
        while done < len(new):
            workers = self._workers()
            try:
                fit = self.clock.fitting(split, len(new) - done, workers) if timed else len(new) - done
            except OutOfTime:
                return new[done]
            if timed and self.options.time_budget is not None:
                fit = min(fit, workers)
            chunk = new[done:done + fit]
            prepare([candidates[index] for index in chunk])
            for position, outcome in self.evaluator.evaluate_many([candidates[index].merge for index in chunk], split):
                index = chunk[position]
                for note in outcome.evaluation.notes if outcome.evaluation is not None else ():
                    if note not in self.said:  # every split's scorer and every Ray worker finds it on its own
                        self.said.add(note)
                        self.say(note)
                records[index] = record = self.ledger.append(self._record(candidates[index], split, outcome))
                if record.ok:
                    self.clock.record(split, record.merge_seconds + record.eval_seconds)
                    if candidates[index].label:
                        self.say(f"{candidates[index].label}: {split} objective {record.objective:.4f}")
                arrived(record, True)
                while counted < done + len(chunk) and records[new[counted]] is not None:
                    self._count_failure(records[new[counted]])  # stops the run at the limit, the batch left in flight
                    counted += 1
            done += len(chunk)
        return None

    def _workers(self) -> int:
        """How many workers evaluate a batch at once now (Ray workers may be lost during a run)."""
        return max(1, getattr(self.evaluator, "alive", 1))

    def evaluate_one(self, candidate: Candidate, split: Split, timed: bool = True) -> EvaluationRecord:
        return self.evaluate([candidate], split, timed)[0]

    def _record(self, candidate: Candidate, split: Split, outcome: Outcome) -> EvaluationRecord:
        """The journal record of a candidate just evaluated."""
        evaluation = outcome.evaluation
        fields = dict(type="evaluation", split=split, kind=candidate.kind, name=candidate.name, **candidate.extra,
                      weights=candidate.merge.weights, scale=candidate.merge.scale, key=candidate.merge.key,
                      reused=None, worker=outcome.worker)
        if outcome.error is not None:
            timing = ({"merge_seconds": round(evaluation.merge_seconds, 4), "eval_seconds": round(evaluation.eval_seconds, 4)}
                      if evaluation is not None else {"merge_seconds": None, "eval_seconds": round(outcome.seconds, 4)})
            return EvaluationRecord(**fields, status="failed", scores=None, objective=None, error=outcome.error,
                                    **timing, time=now())
        documents = None
        if evaluation.documents is not None:  # compact: 0/1 accuracies as integers
            documents = {task: [int(v) if v.is_integer() else round(v, 6) for v in values]
                         for task, values in evaluation.documents.items()}
        return EvaluationRecord(**fields, status="ok", scores=evaluation.scores, objective=evaluation.objective,
                                error=None, merge_seconds=round(evaluation.merge_seconds, 4),
                                eval_seconds=round(evaluation.eval_seconds, 4), documents=documents, time=now())

    def _reuse(self, candidate: Candidate, split: Split, earlier: EvaluationRecord) -> EvaluationRecord:
        """The record of a candidate whose merge `earlier` scored: its scores, at no cost."""
        return EvaluationRecord(type="evaluation", split=split, kind=candidate.kind, name=candidate.name,
                                **candidate.extra, weights=candidate.merge.weights, scale=candidate.merge.scale,
                                key=candidate.merge.key, status=earlier.status, scores=earlier.scores,
                                objective=earlier.objective, error=earlier.error, merge_seconds=0.0,
                                eval_seconds=0.0, reused=earlier.name, time=now(), documents=earlier.documents)

    def _count_failure(self, record: EvaluationRecord) -> None:
        if record.ok:
            self.failures_in_a_row = 0
            return
        self.say(f"{record.name} failed: {record.error}")
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= constants.MAX_CONSECUTIVE_FAILURES:
            raise SearchAbortedError(self.options.run_dir, self.failures_in_a_row, record.error)

    # -- the stages -------------------------------------------------------------------------

    def baselines(self) -> Dict[str, Merge]:
        """Score every baseline on the search tasks, then on the holdout tasks (outside the budget): the single
        checkpoints and the uniform soup as one batch, then the greedy soup's steps one after the other."""
        names = self.pool.names
        first = [Candidate(merge, kind, name, label=f"baseline {name}") for kind, name, merge in first_baselines(names)]
        # Each checkpoint, the uniform soup, at most count - 1 greedy steps and the greedy soup.
        with self._progress("baselines, search tasks", 2 * len(names) + 1) as bar:
            records = self.evaluate(first, "search", arrived=lambda record, fresh: bar(1))
            objectives = {candidate.name: record.objective for candidate, record in zip(first, records)
                          if candidate.kind == "checkpoint" and record.ok}

            def greedy_step(merge: Merge, kind: str, name: str) -> Optional[float]:
                # Said by greedy_soup, with whether it was kept.
                record = self.evaluate_one(Candidate(merge, kind, name), "search")
                bar(1)
                return record.objective

            greedy = greedy_soup(names, objectives, greedy_step, self.say)
            self.evaluate_one(Candidate(greedy, "greedy", "greedy soup"), "search")
            bar(1)
        merges = {candidate.name: (candidate.kind, candidate.merge) for candidate in first}
        merges["greedy soup"] = ("greedy", greedy)
        with self._progress("baselines, holdout tasks", len(merges)) as bar:
            self.evaluate([Candidate(merge, kind, name, label=f"baseline {name}") for name, (kind, merge) in merges.items()],
                          "holdout", arrived=lambda record, fresh: bar(1))
        self.save()
        self.baseline_kinds = {name: kind for name, (kind, merge) in merges.items()}
        return {name: merge for name, (kind, merge) in merges.items()}

    def search(self, baselines: Dict[str, Merge]) -> None:
        """CMA-ES, a generation at a time, until the budget is spent: from the best baseline, with the soups injected.

        Each generation: ask; sort the points into replayed (journaled), reused (merges scored before) and new
        ones; cut the batch to the budget and the time budget; evaluate it, journaling each result as it
        arrives; tell, in proposal order.
        """
        start = self._search_start(baselines)
        cma = CMAES(start.x0, self.recipe.search.sigma0, seed=self.options.seed,
                    population=self.recipe.search.population, inject=start.inject)
        self.cma = cma  # where the search stands: its mean is a finalist of the selection
        evaluations = self.ledger.evaluations()
        if evaluations < self.options.budget and hasattr(self.evaluator, "note_population"):
            self.evaluator.note_population(cma.population_size)
        # No bar when the budget is spent already: tqdm would show a count past its total as "200/None".
        bar = self._progress_bar(evaluations) if evaluations < self.options.budget else None
        next_id = 0
        try:
            # Every journaled generation is replayed, even with no budget left: the selection starts from
            # the state the search ended in (its mean is a finalist), whichever session asks.
            while evaluations < self.options.budget or self.ledger.proposal(next_id) is not None:
                points = cma.ask()
                candidates = [self._proposal(point, next_id + offset, cma.generation) for offset, point in enumerate(points)]
                next_id += len(points)
                candidates = self._within_budget(candidates, self.options.budget - evaluations)

                def arrived(record: EvaluationRecord, fresh: bool) -> None:
                    if fresh and record.reused is None and bar:
                        busy = getattr(self.evaluator, "busy", None)
                        bar.set_postfix_str(f"best {self.ledger.best:.4f}" + (
                            f", {busy}/{self._workers()} workers busy" if busy is not None else ""), refresh=False)
                        bar.update(1)

                records = self.evaluate(candidates, "search", arrived=arrived, prepare=self._write_proposals)
                evaluations = self.ledger.evaluations()
                if len(records) < len(points):
                    return  # the budget ends inside this generation
                cma.tell(points, [-r.objective if r.ok else start.failed_fitness for r in records])
                self._check_replay(cma)
                self.save(cma)
        finally:
            if bar:
                bar.close()

    def _proposal(self, point: List[float], proposal_id: int, generation: int) -> Candidate:
        """A point CMA-ES asked for, as a candidate; checked against the journal when it was evaluated before."""
        recorded = self.ledger.proposal(proposal_id)
        if recorded is not None and not _close(recorded.coordinates, point):
            raise RunDirError(self.options.run_dir, f"{JOURNAL}: proposal {proposal_id} does not match what this search "
                              "proposes; the journal comes from another version or was edited: rerun with --restart")
        return Candidate(self.space.merge(point), "proposal", f"proposal {proposal_id:06d}",
                         extra={"id": proposal_id, "generation": generation, "coordinates": point})

    def _within_budget(self, candidates: List[Candidate], left: int) -> List[Candidate]:
        """The proposals up to (not including) the first new evaluation the budget has no room for."""
        batch = set()
        for index, candidate in enumerate(candidates):
            if self.ledger.proposal(candidate.extra["id"]) is None and self.ledger.scored(candidate.merge, "search") is None \
                    and candidate.merge.key not in batch:
                if left <= 0:
                    return candidates[:index]
                left -= 1
                batch.add(candidate.merge.key)
        return candidates

    def _write_proposals(self, candidates: List[Candidate]) -> None:
        """Each proposal as a mergekit YAML, written before it is evaluated."""
        for candidate in candidates:
            path = self.proposals_dir / f"{candidate.extra['id']:06d}.yaml"
            with writing(path, self.options.run_dir):
                write_merge_config(path, candidate.merge, self.pool, self.recipe.merge.dtype,
                                   f"{candidate.name} (generation {candidate.extra['generation']}) of {self.recipe.name}")

    def save(self, cma: Optional[CMAES] = None, final: bool = False) -> None:
        """After a stage or a generation that added to the journal: write search.json, then call `saved`."""
        if len(self.ledger.records) == self.saved_at and not final:
            return  # replayed: nothing new
        if cma is not None:
            with writing(self.options.run_dir / SEARCH_STATE, self.options.run_dir):
                write_atomically(self.options.run_dir / SEARCH_STATE, json.dumps(
                    {**cma.state(), "evaluations": self.ledger.evaluations(), "records": len(self.ledger.records)},
                    indent=1))
        self.saved_at = len(self.ledger.records)
        self.saved(final=final)

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

    def _search_start(self, baselines: Dict[str, Merge]) -> SearchRecord:
        """Where CMA-ES starts and what it is shown first, journaled once: a resumed run replays
        the search from the same start even if a baseline that had failed scores now."""
        recorded = self.ledger.journal.of_type(SearchRecord)
        if recorded:
            return recorded[0]
        objectives = {name: record.objective for name, merge in baselines.items()
                      if (record := self.ledger.scored(merge, "search")) is not None}
        singles = [name for name in self.pool.names if name in objectives]
        # The search starts from the best of these and is shown the others (pycma's inject).
        seeds = ([max(singles, key=objectives.get)] if singles else []) + [
            name for name in ("uniform soup", "greedy soup") if name in objectives]
        start = max(seeds, key=objectives.get) if seeds else "uniform soup"
        injected = [name for name in seeds if name != start and baselines[name] != baselines[start]]
        return self.ledger.append(SearchRecord(
            start=start, injected=injected, x0=self._start_point(baselines[start]),
            inject=[self._start_point(baselines[name]) for name in injected],
            # Below every real candidate: the objective of a failed one counts as the worst baseline's minus 1.
            failed_fitness=1.0 - min(objectives.values(), default=0.0)))

    def _start_point(self, baseline: Merge) -> List[float]:
        """A baseline's coordinates, at the scale the search starts from (baselines have scale 1)."""
        return self.space.coordinates(baseline.model_copy(update={"scale": self.space.start_scale()}))

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

    def select(self, baselines: Dict[str, Merge]) -> Optional[SelectionRecord]:
        """Choose the winner (see selection.py) and journal the decision; None when nothing was scored."""
        from mergekit_recycle.report import winner_record

        settings = self.recipe.selection
        if not settings.enabled or not baselines:
            best = winner_record(self.ledger.records)
            if best is None:
                return None
            why = ("the time budget ran out during the baselines: the best merge on the search tasks wins" if settings.enabled
                   else "holdback 0: the best merge on the search tasks wins, with no held-back check")
            decision = Decision(best.name, best.kind, best.name, None, None, None, None, why)
            return self._decided(decision, Merge(weights=best.weights, scale=best.scale))
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
        scored = [r for r in self.ledger.journal.of_type(EvaluationRecord) if r.kind in ("proposal", "greedy-step")
                  and r.split == "search" and r.ok]
        # Of equals, the earliest as a serial run journals them: the greedy soup's steps, then proposals by id
        # (a batch on Ray journals its results in the order they arrive).
        order = sorted(range(len(scored)), key=lambda i: (-scored[i].objective, scored[i].kind == "proposal",
                                                          scored[i].id if scored[i].kind == "proposal" else i))
        seen = {merge.key for merge in baselines.values()}  # a baseline is a contender already
        finalists: Dict[str, tuple] = {}
        for record in (scored[i] for i in order):
            if len(finalists) == self.recipe.selection.finalists:
                break
            if tuple(record.key) not in seen:
                seen.add(tuple(record.key))
                finalists[record.name] = (record.kind, Merge(weights=record.weights, scale=record.scale))
        if self.cma is not None:
            mean = self.space.merge(self.cma.mean)
            if mean.key not in seen:
                # Named by the evaluations it follows: a run continued with a larger budget has another mean.
                name = f"CMA-ES mean @{self.ledger.evaluations()}"
                self.evaluate_one(Candidate(mean, "mean", name), "search", timed=False)  # for the report: it never chooses
                finalists[name] = ("mean", mean)
        return finalists

    def _contenders(self, baselines: Dict[str, Merge]) -> Dict[str, tuple]:
        """name -> (Contender, Merge): every baseline and every finalist, scored on the held-back documents as one batch."""
        entries = [(name, self.baseline_kinds[name], merge) for name, merge in baselines.items()]
        entries += [(name, kind, merge) for name, (kind, merge) in self._finalists(baselines).items()]
        with self._progress("selection, held-back documents", len(entries)) as bar:
            records = self.evaluate([Candidate(merge, "finalist" if kind in FINALIST_KINDS else kind, name)
                                     for name, kind, merge in entries], "selection", timed=False,
                                    arrived=lambda record, fresh: bar(1))
        contenders: Dict[str, tuple] = {}
        for (name, kind, merge), record in zip(entries, records):
            searched = self.ledger.scored(merge, "search")
            if record.ok and searched is not None:  # a merge that failed to score cannot win
                contenders[name] = (Contender(name, kind, searched.objective, record.objective, record.documents), merge)
        return contenders

    def _decided(self, decision: Decision, merge: Merge, finalists: Sequence[str] = ()) -> SelectionRecord:
        """Journal the decision: every session that finishes records the one its report shows."""
        return self.ledger.append(SelectionRecord(
            time=now(), evaluations=self.ledger.evaluations(), **decision.record(), finalists=list(finalists),
            holdback=self.recipe.selection.holdback, confidence=self.recipe.selection.confidence,
            weights=merge.weights, scale=merge.scale, key=merge.key))

    def finish(self, baselines: Dict[str, Merge]) -> Optional[Merge]:
        """Choose the winner, score it on the holdout tasks and write it as a mergekit YAML; None if nothing scored."""
        selected = self.select(baselines)
        if selected is None:
            return None
        merge = Merge(weights=selected.weights, scale=selected.scale)
        # Untimed: the time budget reserved room for it.
        self.evaluate_one(Candidate(merge, "optimized", selected.winner, label=f"winner {selected.winner}"), "holdout",
                          timed=False)
        with writing(self.options.run_dir / WINNER, self.options.run_dir):
            write_merge_config(self.options.run_dir / WINNER, merge, self.pool, self.recipe.merge.dtype,
                               f"the winner of {self.recipe.name}: {selected.winner} ({selected.reason})")
        return merge


def _beside_bars(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say`, moving any progress bar out of the way of the line (tqdm redraws it below)."""
    from tqdm import tqdm

    def said(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            say(line)

    return said


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
    runs = journal.of_type(RunRecord)
    if runs:
        prints = fingerprint(recipe, pool, absolute_paths=runs[0].version == 1)
        earlier = runs[0].fingerprint
        # Runs from before winner selection chose by the search objective alone: `holdback: 0` continues them.
        legacy = "selection" not in earlier and not recipe.selection.enabled
        changed = [part for part in prints if prints[part] != earlier.get(part) and not (part == "selection" and legacy)]
        if changed and not journal.of_type(EvaluationRecord):
            # Nothing was computed (a start that stopped on a typo, Ctrl-C, a killed first load): the fixed
            # recipe takes the run over. The sessions stay as the history of what was asked; the run record
            # is written afresh by start_session, and the other records (a finish) belonged to the old run.
            journal.rewrite(journal.of_type(SessionRecord))
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


def _seed_of_run(run: RunRecord, recipe: Recipe, seeds: Sequence[int]) -> Optional[int]:
    """The seed `run` searched with, when the seed is all that tells its search settings from `recipe`'s.

    Runs record their seed; for an older run, each of `seeds` is tried against its fingerprint.
    """
    earlier = run.fingerprint.get("search")
    for seed in ([run.seed] if run.seed is not None else seeds):
        if seed != recipe.search.seed and _digest(_search_settings(_with_seed(recipe, seed))) == earlier:
            return seed
    return None


def run_identity(recipe: Recipe, pool: Pool) -> Json:
    """The part of the `run` record that names this machine's checkpoints (and the entries they came from)."""
    entries = {f"pool[{i}]": entry for i, entry in enumerate(recipe.pool)}
    if recipe.base is not None:
        entries["base"] = recipe.base
    return {"checkpoints": [c.model_dump(mode="json") for c in pool.checkpoints],
            "base": pool.base.model_dump(mode="json") if pool.base else None,
            # The entries the checkpoints were resolved from: their Hub pins hold while an entry is unchanged.
            "entries": {location: entry.model_dump(mode="json") for location, entry in entries.items()}}


def start_session(journal: Journal, recipe: Recipe, pool: Pool, options: RunOptions, recipe_text: str,
                  batch_size: Optional[BatchSize] = None, batch_size_device: Optional[str] = None) -> None:
    """Journal what this run is (once, when it first gets going) and what this session was asked, with the
    batch size its evaluator scores with."""
    if not journal.of_type(RunRecord):
        run = RunRecord(
            version=2, recipe=recipe.name, fingerprint=fingerprint(recipe, pool), started=now(),
            seed=recipe.search.seed, **run_identity(recipe, pool),
            tasks=[{"name": t.name, "search": t.search, "holdout": t.holdout, "metric": t.metric, "weight": t.weight}
                   for t in recipe.tasks])
        # The run record comes first; a run taken over by a fixed recipe keeps its earlier sessions after it.
        if journal.records:
            journal.rewrite([run, *journal.records])
        else:
            journal.append(run)
    journal.append(SessionRecord(started=now(), budget=options.budget, seed=options.seed,
                                 time_budget=options.time_budget, device=options.device, workers=options.workers,
                                 batch_size=batch_size, batch_size_device=batch_size_device))
    with writing(options.run_dir / RECIPE_COPY, options.run_dir):
        write_atomically(options.run_dir / RECIPE_COPY, recipe_text)


def earlier_pins(options: RunOptions, hub_state: Optional["HubState"] = None) -> Dict[str, Any]:
    """The Hub pins of the run in options.run_dir, else of the run kept on the Hub (none for a new run or --restart)."""
    from mergekit_recycle.hub_pool import pins_from_run

    path = options.run_dir / JOURNAL
    if options.restart:
        return {}
    runs = Journal(path, repair=False).of_type(RunRecord) if os.path.isfile(path) else []
    if not runs and hub_state is not None:
        runs = [record for record in hub_state.records if isinstance(record, RunRecord)]
    return pins_from_run(runs[0] if runs else None)


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
    if options.uses_ray:
        from mergekit_recycle.ray_evaluator import ray_module

        ray_module()  # installed? Asked before anything is loaded
    # Before the run folder is made: a refused device leaves none behind. On Ray, the workers' device is the
    # cluster's to say (ray_evaluator); this process only writes the winner to disk, on its own device.
    device = resolve_device("auto" if options.uses_ray else options.device)
    pins = earlier_pins(options, hub_state)
    pool = resolve_pool(recipe, source, pins=pins)
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
        say(f"pool: {len(pool.checkpoints)} checkpoints ({', '.join(pool.names)})"
            + ("" if options.uses_ray else f", device {device}"))
        if evaluator is not None:
            candidate_evaluator = evaluator(recipe, pool, device, source)
        elif options.uses_ray:
            from mergekit_recycle.ray_evaluator import RayEvaluator

            candidate_evaluator = RayEvaluator.start(recipe, source, pool, pins_of(recipe, pool), options.device,
                                                     options.workers, options.ray_address, options.cpus_per_worker,
                                                     in_memory=options.in_memory, batch_size=options.batch_size, say=say)
        else:
            candidate_evaluator = ResidentEvaluator(recipe, pool, device, source, in_memory=options.in_memory,
                                                    batch_size=run_batch_size(journal, options.batch_size, device, say))
        try:
            if hasattr(candidate_evaluator, "describe"):
                say(candidate_evaluator.describe())
            # Only now, once the pool loaded: a run that could not start leaves no record to be refused by.
            batch_size = getattr(candidate_evaluator, "batch_size", None)
            start_session(journal, recipe, pool, options, source.read_text(encoding="utf-8"), batch_size,
                          hardware(device) if options.batch_size == "auto" and isinstance(batch_size, int) else None)
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
                _journal_workers(journal, candidate_evaluator)
                write_report(options.run_dir, build_report(journal.records), journal.records)
                with contextlib.suppress(HubStateError):  # the run folder keeps it; the abort is the news
                    run.save(final=True)
                raise
            winner = run.finish(baselines)
            _journal_workers(journal, candidate_evaluator)
        finally:
            if hasattr(candidate_evaluator, "close"):
                candidate_evaluator.close()
        journal.append(FinishRecord(time=now(), stopped_early=stopped_early))
        report = build_report(journal.records)
        write_report(options.run_dir, report, journal.records)
        # A run kept on the Hub merges its winner only to publish it (publish_policy.conclude): a night that
        # does not beat the published model skips writing the pool's worth of weights.
        if winner is not None and hub_state is None:
            merge_winner(options.run_dir, device, trust_remote_code=recipe.merge.trust_remote_code)
        return report


def run_batch_size(journal: Journal, asked: BatchSize, device: str, say: Callable[[str], None]) -> BatchSize:
    """`asked`, unless it is auto and an earlier session of the run chose one on this hardware: once per run."""
    if asked != "auto":
        return asked
    here = hardware(device)
    chosen = [session.batch_size for session in journal.of_type(SessionRecord)
              if session.batch_size_device == here and isinstance(session.batch_size, int)]
    if chosen:
        say(f"batch size {chosen[-1]}: chosen by --batch-size auto in an earlier session of this run ({here})")
        return chosen[-1]
    return asked


def pins_of(recipe: Recipe, pool: Pool) -> Dict[str, Any]:
    """The Hub pins of this run's pool, as every Ray node resolves it again: the SHAs, not the files."""
    from mergekit_recycle.hub_pool import pins_from_run

    return pins_from_run(RunRecord(**run_identity(recipe, pool)))


def _journal_workers(journal: Journal, evaluator: CandidateEvaluator) -> None:
    """What each Ray worker did this session (the report's `workers`); nothing for a run in one process."""
    if hasattr(evaluator, "statistics"):
        journal.append(evaluator.statistics(now()))


def merge_winner(run_dir: Path, device: str, trust_remote_code: bool = False) -> Path:
    """Merge winner.yaml to RUN_DIR/merged with mergekit (lazy loading; CUDA when the run uses a GPU).

    A merge that fails leaves no merged.partial/ behind, journals the failure (the report is then not
    finished) and raises FinalMergeError, one line naming the architecture and the tensor.
    """
    from mergekit.options import MergeOptions
    from transformers.utils import logging as transformers_logging

    from mergekit_recycle.merge import merge_yaml

    target, partial = run_dir / MERGED, run_dir / MERGED_PARTIAL
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
    runs = Journal(run_dir / JOURNAL, repair=False).of_type(RunRecord)
    return runs[0].recipe if runs else "merged"


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
    runs = journal.of_type(RunRecord)
    try:
        architecture = read_architecture(Path(runs[0].checkpoints[0]["path"]))
    except (OSError, ValueError, IndexError, KeyError):
        architecture = "the pool's architecture"
    error = FinalMergeError(run_dir, architecture, f"{writing_file}{type(exc).__name__}: {reason}", tensor)
    journal.append(MergeFailedRecord(time=now(), architecture=architecture, tensor=tensor, error=error.reason))
    write_report(run_dir, build_report(journal.records), journal.records)
    return error
