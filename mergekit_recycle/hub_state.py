"""The search state on the Hub: a run's journal and CMA-ES state, kept in its output repo's `recycle/`.

`optimize --resume-from-hub` keeps a run on the Hub, so that ephemeral runners (a nightly GitHub
Actions job) continue one search:
  - at start, `HubState.read` fetches recycle/journal.jsonl and recycle/search.json at the repo's
    head, and `adopt` extends the run folder's journal with what the Hub has beyond it;
  - after the baselines and after every generation, `save` commits both files (one small commit;
    at most one a minute by default, as the Hub limits commits per repo and hour), so a runner
    killed mid-search loses at most the generation it was in, or that minute;
  - at the end, publish_policy.conclude pushes a new model revision only when the winner's holdout
    objective beats the published one (recycle/report.json), and otherwise commits the state alone.
Every commit names the commit it follows (`parent_commit`). When another writer committed in
between, the Hub refuses it (412): if the other commit left the search state alone (someone
edited the card; a model revision replaces the card all the same), or holds this run's own
earlier state, the commit is made again on top of it; otherwise the run stops rather than
overwrite another run's state.

The journal is published as `export_journal` gives it: without this machine's paths. A runner
that adopts it names its own checkpoint folders in the `run` record (`run_identity`).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_recycle import constants, hub
from mergekit_recycle.checkpoints import Checkpoint
from mergekit_recycle.errors import ConcurrentRunError, HubStateError, RunDirError
from mergekit_recycle.journal import Journal, dumps, loads
from mergekit_recycle.records import EvaluationRecord, MergeFailedRecord, Record, RunRecord, proposals_evaluated
from mergekit_recycle.run_folder import JOURNAL, SEARCH_STATE, read_search_state

JOURNAL_FILE = "recycle/journal.jsonl"
SEARCH_FILE = "recycle/search.json"
REPORT_FILE = "recycle/report.json"


def export_journal(records: List[Record]) -> List[Record]:
    """The journal as published: without this machine's paths (the run's checkpoint folders, a local
    entry's path, the home folder in an error)."""
    return [_public_run(record) if isinstance(record, RunRecord) else _error_without_home(record)
            for record in records]


def _public_run(run: RunRecord) -> RunRecord:
    """The run record with each checkpoint by its published source, and a local entry by its folder's name.
    (Its checkpoints and entries are JSON: pool.Checkpoint and recipe entries as the journal keeps them.)"""

    def public(checkpoint: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        if checkpoint is None:
            return None
        exported = {key: value for key, value in checkpoint.items() if key != "path"}
        return {**exported, "source": Checkpoint.model_validate(checkpoint).published_source}

    def entry(value: Dict[str, Any]) -> Dict[str, Any]:
        return {**value, "path": f"local:{Path(value['path']).name}"} if "path" in value else value

    return run.model_copy(update={"checkpoints": [public(c) for c in run.checkpoints], "base": public(run.base),
                                  "entries": {k: entry(v) for k, v in (run.entries or {}).items()}})


def _error_without_home(record: Record) -> Record:
    if isinstance(record, (EvaluationRecord, MergeFailedRecord)) and record.error:
        return record.model_copy(update={"error": without_home(record.error)})
    return record


def without_home(message: str) -> str:
    """A message as published: a file under the home folder (a failed evaluation's error may name one) as ~."""
    home = str(Path.home())
    return message if home in ("", "/") else message.replace(home, "~")


def state_files(run_dir: Path) -> Dict[str, bytes]:
    """The search state as the Hub keeps it, by path in the repo: the exported journal and search.json."""
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
    return "".join(dumps(record) for record in records).encode()


def _same(mine: Record, theirs: Record) -> bool:
    """One journal record, as this run has it and as the Hub has it. A `run` record is the same run
    when its fingerprint is: its checkpoints name each machine's own folders."""
    if isinstance(mine, RunRecord) and isinstance(theirs, RunRecord):
        return (mine.fingerprint, mine.started) == (theirs.fingerprint, theirs.started)
    return mine.to_json() == theirs.to_json()


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
        """The Hub's journal, typed (read only when it is continued: --restart replaces even a damaged one)."""
        records = []
        for number, line in enumerate((self.journal or b"").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(loads(line))
            except ValueError as exc:
                raise HubStateError(self.repo_id, f"{JOURNAL_FILE} line {number} at commit {self.head[:7]} {exc}: "
                                    "restore it on the Hub, or rerun with --restart to start a new search there") from None
        return records

    def adopt(self, run_dir: Path, identity: Dict[str, Any], say: Callable[[str], None]) -> None:
        """Extend RUN_DIR's journal with the records the Hub has beyond it (all of them on a fresh runner).

        `identity`: the run record's fields that name this runner's own checkpoint folders
        (optimize.run_identity), which replace the first runner's in the run record adopted.
        Refused when the two are different runs: each would overwrite the other's state.
        """
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
            extra = [extra[0].model_copy(update=identity)] + extra[1:]
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

    def published_report(self) -> Optional[Dict[str, Any]]:
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
