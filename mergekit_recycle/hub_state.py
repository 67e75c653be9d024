"""The search state on the Hub: a run's journal and CMA-ES state, kept in its output repo's `recycle/`.

`optimize --resume-from-hub` keeps a run on the Hub, so that ephemeral runners (a nightly GitHub
Actions job) continue one search:
  - at start, `HubState.read` fetches recycle/journal.jsonl and recycle/search.json at the repo's
    head, and `adopt` extends the run folder's journal with what the Hub has beyond it;
  - after the baselines and after every generation, `save` commits both files (one small commit;
    at most one a minute by default, as the Hub limits commits per repo and hour), so a runner
    killed mid-search loses at most the generation it was in, or that minute;
  - at the end, `conclude` pushes a new model revision only when the winner's holdout objective
    beats the published one (recycle/report.json), and otherwise commits the state alone.
Every commit names the commit it follows (`parent_commit`). When another writer committed in
between, the Hub refuses it (412): if the other commit left the search state alone (someone
edited the card; a model revision replaces the card all the same), or holds this run's own
earlier state, the commit is made again on top of it; otherwise the run stops rather than
overwrite another run's state.

The journal is published as `export_journal` gives it: without this machine's paths. A runner
that adopts it names its own checkpoint folders in the `run` record (`run_identity`).
"""

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_recycle import constants, hub
from mergekit_recycle.errors import ConcurrentRunError, HubStateError, PublishError, RunDirError
from mergekit_recycle.journal import JOURNAL, Journal, now

Record = Dict[str, Any]
JOURNAL_FILE = "recycle/journal.jsonl"
SEARCH_FILE = "recycle/search.json"
REPORT_FILE = "recycle/report.json"


def export_journal(records: List[Record]) -> List[Record]:
    """The journal as published: without this machine's paths."""
    from mergekit_recycle.pool import Checkpoint

    def public(checkpoint: Optional[Record]) -> Optional[Record]:
        if checkpoint is None:
            return None
        exported = {key: value for key, value in checkpoint.items() if key != "path"}
        return {**exported, "source": Checkpoint.model_validate(checkpoint).published_source}

    def entry(value: Record) -> Record:
        return {**value, "path": f"local:{Path(value['path']).name}"} if "path" in value else value

    exported = []
    for record in records:
        record = without_home(record)
        if record.get("type") == "run":
            record = {**record, "checkpoints": [public(c) for c in record["checkpoints"]], "base": public(record.get("base")),
                      "entries": {k: entry(v) for k, v in record.get("entries", {}).items()}}
        exported.append(record)
    return exported


def without_home(record: Record) -> Record:
    """A failed evaluation's message may name a file under the home folder: given as ~ instead."""
    home = str(Path.home())
    if not record.get("error") or home in ("", "/"):
        return record
    return {**record, "error": record["error"].replace(home, "~")}


def state_files(run_dir: Path) -> Dict[str, bytes]:
    """The search state as the Hub keeps it, by path in the repo: the exported journal and search.json."""
    from mergekit_recycle.optimize import SEARCH_STATE

    records = export_journal(Journal(run_dir / JOURNAL, repair=False).records)
    files = {JOURNAL_FILE: _lines(records)}
    if (run_dir / SEARCH_STATE).is_file():
        files[SEARCH_FILE] = (run_dir / SEARCH_STATE).read_bytes()
    return files


def hub_journal_is_behind(repo_id: str, journal: bytes) -> bool:
    """Whether the repo's search state is none, or this journal's beginning (so replacing it loses nothing)."""
    _, theirs = _journal_at_head(repo_id)
    return theirs is None or journal.startswith(theirs)


def _journal_at_head(repo_id: str) -> Tuple[Optional[str], Optional[bytes]]:
    """The head of the repo's main branch, and recycle/journal.jsonl there (None: no such file).
    (None, None) when the repo does not exist yet: the first commit creates it."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        head = hub.api().repo_info(repo_id).sha
    except RepositoryNotFoundError:
        return None, None
    return head, _download(repo_id, JOURNAL_FILE, head)


def _lines(records: List[Record]) -> bytes:
    return "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records).encode()


def _same(mine: Record, theirs: Record) -> bool:
    """One journal record, as this run has it and as the Hub has it. A `run` record is the same run
    when its fingerprint is: its checkpoints name each machine's own folders."""
    if mine.get("type") == "run" == theirs.get("type"):
        return (mine.get("fingerprint"), mine.get("started")) == (theirs.get("fingerprint"), theirs.get("started"))
    return mine == theirs


@dataclass
class HubState:
    """The search state of one output repo, as this run last read or wrote it."""

    repo_id: str
    head: Optional[str]  # the commit this run's next commit must follow; None: the repo does not exist yet
    journal: Optional[bytes]  # recycle/journal.jsonl as the Hub has it at `head`
    search: Optional[bytes]  # recycle/search.json as the Hub has it at `head`
    last_save: float = float("-inf")  # time.monotonic() of this run's latest save
    private: bool = True  # of the repo the first commit creates, when it does not exist yet

    @classmethod
    def read(cls, repo_id: str, private: bool = True) -> "HubState":
        """The state at the head of repo_id's main branch; empty when the repo keeps none yet, or does not exist."""
        try:
            head, journal = _journal_at_head(repo_id)
            search = _download(repo_id, SEARCH_FILE, head) if head is not None else None
            return cls(repo_id=repo_id, head=head, journal=journal, search=search, private=private)
        except Exception as exc:  # noqa: BLE001 - one line, before anything is computed
            raise HubStateError(repo_id, hub.failure(exc, repo_id, offline_hint=False)) from None

    @property
    def records(self) -> List[Record]:
        """The Hub's journal, parsed (only when it is continued: --restart replaces even a damaged one)."""
        records = []
        for number, line in enumerate((self.journal or b"").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise HubStateError(self.repo_id, f"{JOURNAL_FILE} line {number} at commit {self.head[:7]} is not "
                                    "JSON: restore it on the Hub, or rerun with --restart to start a new search "
                                    "there") from None
        return records

    def adopt(self, run_dir: Path, identity: Record, say: Callable[[str], None]) -> None:
        """Extend RUN_DIR's journal with the records the Hub has beyond it (all of them on a fresh runner).

        Refused when the two are different runs: each would overwrite the other's state.
        """
        from mergekit_recycle.optimize import SEARCH_STATE, proposals_evaluated

        theirs = self.records
        path = run_dir / JOURNAL
        local = Journal(path).records if path.is_file() else []
        mine = export_journal(local)
        for index, (a, b) in enumerate(zip(mine, theirs)):
            if not _same(a, b):
                raise RunDirError(run_dir, f"{JOURNAL} and the search state on {self.repo_id} (commit "
                                  f"{self.head[:7]}) differ from record {index + 1} on: they are two runs. Continue "
                                  "the Hub's with another --run-dir, or rerun with --restart to replace it with a new run")
        if len(theirs) <= len(mine):
            return
        extra = theirs[len(mine):]
        if not local:
            # The Hub's run record names the first runner's folders; this runner names its own.
            extra = [{**extra[0], **identity}] + extra[1:]
        journal = Journal(path)
        for record in extra:
            journal.append(record)
        if self.search is not None:
            (run_dir / SEARCH_STATE).write_bytes(self.search)
        say(f"resumed from {self.repo_id} (commit {self.head[:7]}): {proposals_evaluated(theirs)} evaluations so far")

    def save(self, run_dir: Path, say: Callable[[str], None], message: Optional[str] = None,
             final: bool = False) -> Optional[str]:
        """Commit the search state when it changed since the last commit; the new head, or None.

        Saves during the search come at most every MERGEKIT_RECYCLE_SAVE_INTERVAL seconds (the Hub
        limits commits per repo and hour), and a failed one is reported and left to the next (the
        run folder keeps everything). The `final` save always commits, and fails loudly.
        """
        from mergekit_recycle.optimize import read_search_state

        if not final and time.monotonic() - self.last_save < constants.save_interval():
            return None
        files = state_files(run_dir)
        if files[JOURNAL_FILE] == self.journal and files.get(SEARCH_FILE) == self.search:
            return None
        state = read_search_state(run_dir) or {}
        best, count = state.get("best_fitness"), files[JOURNAL_FILE].count(b"\n")
        title = message or (f"mergekit-recycle: search state, {count} records, "
                            f"{state.get('evaluations', 0)} evaluations"
                            + (f", best search objective {-best:.4f}" if best is not None else ""))

        def commit(parent: str):
            from huggingface_hub import CommitOperationAdd

            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
            return hub.api().create_commit(self.repo_id, operations, commit_message=title, parent_commit=parent)

        try:
            info = self.commit(commit, files)
        except ConcurrentRunError:
            raise
        except Exception as exc:  # noqa: BLE001 - the Hub being down must not end a night's search
            reason = hub.failure(exc, self.repo_id, offline_hint=False)
            if final:
                raise HubStateError(self.repo_id, f"saving the search state failed: {reason}; {run_dir} keeps it "
                                    "(the workflow uploads its journal as an artifact)") from None
            say(f"could not save the search state to {self.repo_id} ({reason}); trying again after the next generation")
            return None
        self.last_save = time.monotonic()
        return info.oid

    def commit(self, make: Callable[[str], Any], files: Dict[str, bytes]) -> Any:
        """make(parent) → CommitInfo of `files` (and whatever else make commits) on top of `head`.

        When the Hub refuses it (412: a commit came in between), it is made again on top of the newer
        head if that commit left the search state alone, or holds this run's own earlier state (a commit
        of ours that landed although its answer was lost); otherwise another run wrote it.
        """
        from huggingface_hub.errors import HfHubHTTPError

        if self.head is None:
            self.head = hub.ensure_repo(self.repo_id, self.private)
        for _ in range(3):
            try:
                info = make(self.head)
                break
            except HfHubHTTPError as exc:
                if exc.response is None or exc.response.status_code != 412:
                    raise
                self._follow(files[JOURNAL_FILE])
        else:
            raise HubStateError(self.repo_id, "the repo kept moving while this run tried to commit to it; rerun "
                                "the same command")
        self.head, self.journal, self.search = info.oid, files[JOURNAL_FILE], files.get(SEARCH_FILE)
        return info

    def _follow(self, mine: bytes) -> None:
        head, theirs = _journal_at_head(self.repo_id)
        ours = theirs == self.journal or (theirs is not None and mine.startswith(theirs))
        if not ours:
            title = next((c.title for c in hub.api().list_repo_commits(self.repo_id) if c.commit_id == head), "")
            raise ConcurrentRunError(self.repo_id, self.head, head, title)
        self.head, self.journal, self.search = head, theirs, _download(self.repo_id, SEARCH_FILE, head)

    def published_report(self) -> Optional[Record]:
        """recycle/report.json of the model the repo holds (None before the first model revision)."""
        data = _download(self.repo_id, REPORT_FILE, self.head) if self.head is not None else None
        if data is None:
            return None
        try:
            report = json.loads(data)
        except ValueError:
            report = None
        # A report that cannot be read is published all the same: {} compares as a model without a score.
        return report if isinstance(report, dict) else {}

    def conclude(self, run_dir: Path, report: Record, destination, push: bool, say: Callable[[str], None],
                 merge_winner: Callable[[], Any]) -> str:
        """After the search: a new model revision if the holdout objective improved (merge_winner() writes it
        to RUN_DIR/merged first), else the state alone. Returns one line saying which, and why.
        """
        from mergekit_recycle.publish import publish

        decision = decide(report, self.published_report() if push else None, push)
        if decision.publish:
            merge_winner()
            staged = state_files(run_dir)  # what the model's commit holds: publish() journals the push after it
            try:
                info = self.commit(lambda parent: publish(run_dir, destination, say, parent_commit=parent,
                                                          message=decision.title, note=decision.record), staged)
            except PublishError:
                # The next run publishes when it still beats the model; it must find this run's state.
                with contextlib.suppress(HubStateError):
                    self.save(run_dir, say, final=True, message=f"mergekit-recycle: search state, "
                              f"{report['evaluations']} evaluations; publishing the model failed")
                raise
            outcome = f"published {info.commit_url}: {decision.summary}"
        else:
            Journal(run_dir / JOURNAL).append({"type": "kept", "repo": self.repo_id, **decision.record, "time": now()})
            outcome = f"model unchanged on {self.repo_id}: {decision.summary}"
        self.save(run_dir, say, message=f"mergekit-recycle: search state, {report['evaluations']} evaluations; "
                  + ("published a new model" if decision.publish else "model unchanged: " + decision.summary),
                  final=True)
        return outcome


@dataclass(frozen=True)
class Decision:
    publish: bool
    summary: str  # why, in a few words
    title: str  # the commit message of a new model revision
    record: Record  # what the journal keeps of the decision


def holdout_objective(report: Optional[Record]) -> Optional[float]:
    """The optimized merge's holdout objective in a report (None when it was not scored, or not readable)."""
    try:
        row = next((r for r in (report or {}).get("rows", []) if r.get("kind") == "optimized"), None)
        value = row["holdout"]["objective"] if row and row.get("holdout") else None
    except (AttributeError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _same_tasks(mine: Record, theirs: Record) -> bool:
    """The same tasks, metrics and weights (reports from before the fingerprint: the same task names)."""
    if isinstance(theirs.get("fingerprint"), dict):
        return theirs["fingerprint"].get("tasks") == mine["fingerprint"]["tasks"]
    return theirs.get("tasks") == mine["tasks"]


def decide(report: Record, published: Optional[Record], push: bool) -> Decision:
    """Whether this run's winner should replace the published model: only a better holdout objective on
    the same tasks does (a different winner that scores the same does not)."""
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


def _download(repo_id: str, filename: str, revision: str) -> Optional[bytes]:
    """A small file of the repo at a commit, or None when the commit has no such file.

    Only the Hub saying so means "no such file": a connection error or a 5xx raises, or a run would
    start over and replace the state it could not read.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision)).read_bytes()
    except RemoteEntryNotFoundError:
        return None
