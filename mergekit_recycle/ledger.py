"""The ledger: the journal, indexed for the search loop.

The journal (journal.py) stores records; the ledger answers the loop's questions without
scanning it: was this baseline or proposal scored already (a replay), was this very merge
scored under another name (a reuse), what is the best search objective so far, how many
evaluations has the budget spent. Every record the run adds goes through `append`, so the
indexes never fall behind the file.
"""

from typing import Dict, List, Optional, Tuple, TypeVar

from mergekit_recycle.journal import Journal
from mergekit_recycle.proposal import Merge
from mergekit_recycle.records import EvaluationRecord, JournalRecord, Record, Split, proposals_evaluated

R = TypeVar("R", bound=JournalRecord)


class Ledger:
    """The run's journal with its indexes."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self._by_name: Dict[Tuple[str, str, str], EvaluationRecord] = {}  # (kind, name, split) -> its latest record
        self._by_merge: Dict[Tuple[tuple, str], EvaluationRecord] = {}  # (merge key, split) -> first that scored it
        self._proposals: Dict[int, EvaluationRecord] = {}  # proposal id -> its search record
        self.best = float("nan")  # the best search objective so far
        for record in journal.of_type(EvaluationRecord):
            self._index(record)

    @property
    def records(self) -> List[Record]:
        return self.journal.records

    def append(self, record: R) -> R:
        """Journal `record` (on disk before this returns) and index it."""
        self.journal.append(record)
        if isinstance(record, EvaluationRecord):
            self._index(record)
        return record

    def _index(self, record: EvaluationRecord) -> None:
        self._by_name[(record.kind, record.name, record.split)] = record
        if record.kind == "proposal" and record.split == "search" and record.id is not None:
            self._proposals.setdefault(record.id, record)
        if record.ok:
            self._by_merge.setdefault((tuple(record.key), record.split), record)
            if record.split == "search" and not record.objective <= self.best:
                self.best = record.objective

    def named(self, kind: str, name: str, split: Split) -> Optional[EvaluationRecord]:
        """The latest record of this baseline, proposal or finalist on `split`."""
        return self._by_name.get((kind, name, split))

    def scored(self, merge: Merge, split: Split) -> Optional[EvaluationRecord]:
        """The first record that scored this very merge on `split` (under any name); None when none did."""
        return self._by_merge.get((merge.key, split))

    def proposal(self, proposal_id: int) -> Optional[EvaluationRecord]:
        return self._proposals.get(proposal_id)

    def evaluations(self) -> int:
        """Proposals the search evaluated (not reused): what --budget counts."""
        return proposals_evaluated(self.records)

    def durations(self, split: Split) -> List[float]:
        """Seconds each evaluation on `split` took, in journal order (replays and reuses cost nothing)."""
        return [r.merge_seconds + r.eval_seconds for r in self.journal.of_type(EvaluationRecord)
                if r.split == split and r.ok and r.reused is None and r.merge_seconds is not None]

