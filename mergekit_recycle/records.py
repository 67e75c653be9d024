"""The journal's record types, defined once.

Every line of journal.jsonl is one of these, told apart by its `type`. Records are frozen:
what the journal holds is never changed, only appended to. Fields that older versions did not
write have defaults, so every journal written since version 1 still reads; fields this version
does not know (a newer version's) are kept as they are (`extra="allow"`), so a record read and
written again loses nothing.

`to_json` writes a record as the journal keeps it: the fields of a kind of record that only some
records have (a proposal's `id`, a per-document split's `documents`) are left out when unset,
so that the journal reads as it always has.
"""

from typing import Any, ClassVar, Dict, FrozenSet, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["search", "selection", "holdout"]
# A per-document metric value: 0/1 accuracies are kept as integers, which makes the journal compact.
DocumentValue = Union[int, float]


class JournalRecord(BaseModel):
    """What every record has: its type."""

    model_config = ConfigDict(frozen=True, extra="allow")

    # Fields written only when set; the others are written even when None (as they always were).
    OPTIONAL: ClassVar[FrozenSet[str]] = frozenset()

    def to_json(self) -> Dict[str, Any]:
        """The record as one journal line holds it."""
        data = self.model_dump(mode="json")
        return {key: value for key, value in data.items() if not (value is None and key in self.OPTIONAL)}


class RunRecord(JournalRecord):
    """The first line: what the run is, and the fingerprint of what its results depend on."""

    type: Literal["run"] = "run"
    version: int = 1
    recipe: str = "merged"
    fingerprint: Dict[str, str] = Field(default_factory=dict)
    started: Optional[str] = None
    seed: Optional[int] = None  # from version 2 on; older runs are matched against their fingerprint
    checkpoints: List[Dict[str, Any]] = Field(default_factory=list)  # pool.Checkpoint, as JSON
    base: Optional[Dict[str, Any]] = None
    entries: Optional[Dict[str, Dict[str, Any]]] = None  # recipe location -> the pool entry it was resolved from
    tasks: List[Dict[str, Any]] = Field(default_factory=list)
    OPTIONAL: ClassVar[FrozenSet[str]] = frozenset({"seed", "entries", "started"})


class SessionRecord(JournalRecord):
    """One invocation of `optimize` on the run: what it was asked."""

    type: Literal["session"] = "session"
    started: str
    budget: int
    seed: Optional[int] = None  # from issue 15 on
    time_budget: Optional[float] = None
    device: Optional[str] = None
    workers: Optional[int] = None  # Ray workers asked for; None: evaluated in the driver process
    # Rows per forward pass (a setting: scores depend on it only by float rounding), and the hardware
    # (loglikelihoods.hardware) --batch-size auto chose it on, where a resumed run keeps it; "auto" where
    # each Ray worker chose its own.
    batch_size: Optional[Union[int, Literal["auto"]]] = None
    batch_size_device: Optional[str] = None
    OPTIONAL: ClassVar[FrozenSet[str]] = frozenset({"seed", "device", "workers", "batch_size", "batch_size_device"})


class EvaluationRecord(JournalRecord):
    """One merge scored on one split (see journal.py for the kinds)."""

    type: Literal["evaluation"] = "evaluation"
    split: Split
    kind: str
    name: str
    # A proposal of the search:
    id: Optional[int] = None
    generation: Optional[int] = None
    coordinates: Optional[List[float]] = None
    weights: Dict[str, float]
    scale: float = 1.0
    key: Tuple[float, ...]
    status: Literal["ok", "failed"]
    scores: Optional[Dict[str, float]] = None
    objective: Optional[float] = None
    error: Optional[str] = None
    merge_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    reused: Optional[str] = None  # the name of the earlier record whose scores this merge reuses
    time: Optional[str] = None
    documents: Optional[Dict[str, List[DocumentValue]]] = None
    # Which Ray worker scored it (None: the driver process, or reused)
    worker: Optional[int] = None
    OPTIONAL: ClassVar[FrozenSet[str]] = frozenset({"documents", "id", "generation", "coordinates", "worker"})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> Dict[str, Any]:
        data = super().to_json()
        if self.reused is None and "documents" in data:
            # Scored here: the scores' documents come before `reused` and `time`, as they always were written.
            documents = data.pop("documents")
            data = {key: value for key, value in data.items() if key not in ("reused", "time", "worker")} | {
                "documents": documents, "reused": data["reused"], "time": data["time"],
                **({"worker": data["worker"]} if "worker" in data else {})}
        return data


class SearchRecord(JournalRecord):
    """Where CMA-ES starts and what it is shown first, journaled once."""

    type: Literal["search"] = "search"
    start: str
    injected: List[str]
    x0: List[float]
    inject: List[List[float]]
    failed_fitness: float


class SelectionRecord(JournalRecord):
    """The winner a finishing session chose, against which baseline, and why (selection.Decision)."""

    type: Literal["selection"] = "selection"
    time: Optional[str] = None
    evaluations: int = 0
    winner: str
    kind: str
    reference: Optional[str] = None
    challenger: Optional[str] = None
    margin: Optional[float] = None
    lower: Optional[float] = None
    level: Optional[float] = None
    reason: str = ""
    finalists: List[str] = Field(default_factory=list)
    holdback: float = 0.0
    confidence: Optional[float] = None
    weights: Dict[str, float]
    scale: float = 1.0
    key: Tuple[float, ...] = ()


class WorkersRecord(JournalRecord):
    """What each Ray worker of a session did: where it ran, how much it evaluated, how busy it was."""

    type: Literal["workers"] = "workers"
    time: Optional[str] = None
    wall_seconds: float
    workers: List[Dict[str, Any]]  # index, node, device, evaluations, busy_seconds, restarts, lost
    idle_share: float = 0.0  # the share of worker slots a generation leaves idle (population vs workers)


class FinishRecord(JournalRecord):
    type: Literal["finish"] = "finish"
    time: Optional[str] = None
    stopped_early: bool = False


class MergeFailedRecord(JournalRecord):
    """The winner could not be merged to disk."""

    type: Literal["merge_failed"] = "merge_failed"
    time: Optional[str] = None
    architecture: Optional[str] = None
    tensor: Optional[str] = None
    error: str = ""


class HubOutcomeRecord(JournalRecord):
    """What became of a finished run's winner on the Hub (the fields a publish and a kept model share)."""

    type: str  # first on the line, as every record's
    repo: str
    commit: Optional[str] = None
    url: Optional[str] = None
    evaluations: Optional[int] = None
    winner: Optional[str] = None
    # A scheduled run's decision (publish_policy.Decision.record); absent from a plain `publish`:
    holdout: Optional[float] = None
    published_holdout: Optional[float] = None
    summary: Optional[str] = None
    time: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        data = super().to_json()
        if self.summary is None:  # no decision was made: written without its fields, as a plain publish always was
            for key in ("holdout", "published_holdout", "summary"):
                data.pop(key, None)
        return data


class PublishRecord(HubOutcomeRecord):
    """A push of the winner to the Hub."""

    type: Literal["publish"] = "publish"


class KeptRecord(HubOutcomeRecord):
    """A scheduled run whose winner did not beat the published model: the model was kept (no commit)."""

    type: Literal["kept"] = "kept"
    OPTIONAL: ClassVar[FrozenSet[str]] = frozenset({"commit", "url"})


Record = Union[RunRecord, SessionRecord, EvaluationRecord, SearchRecord, SelectionRecord, WorkersRecord,
               FinishRecord, MergeFailedRecord, PublishRecord, KeptRecord]
RECORD_TYPES = {cls.model_fields["type"].default: cls for cls in Record.__args__}


def parse_record(data: Dict[str, Any]) -> Record:
    """A journal line's record, typed. ValueError when it is none of them (an unknown type, a missing field)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown record type {kind!r}")
    return RECORD_TYPES[kind].model_validate(data)


def proposals_evaluated(records: List[Record]) -> int:
    """Proposals the search evaluated (not reused): what --budget counts."""
    return len({r.id for r in records if isinstance(r, EvaluationRecord) and r.kind == "proposal" and r.reused is None})
