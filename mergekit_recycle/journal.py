"""The search journal: an append-only JSON Lines log that a run is replayed from.

Every record is one line, flushed and fsync'ed before `append` returns, so a record is
either on disk whole or not at all. A process killed mid-write leaves at most a torn last
line; opening the journal cuts it off. Nothing else is ever rewritten.

Records (the `type` field):
  - `run`: the first line; the fingerprint of what the results depend on (pool, tasks,
    metrics, search settings) and the resolved pool;
  - `evaluation`: one merge scored on one split: a baseline (`kind` checkpoint, uniform,
    greedy-step, greedy), a proposal of the search (`proposal`, with `id`, `generation`
    and `coordinates`), or the winner's holdout score. `status` is `ok` or `failed`
    (with `error`); a proposal identical to an earlier merge is recorded with `reused`
    and the earlier scores, and costs no evaluation. The `selection` (held-back documents)
    and `holdout` splits also keep each task's metric per document (`documents`);
    the selection's finalists are of kind `finalist`, the CMA-ES mean of kind `mean`;
  - `selection`: the winner each finishing session chose, against which baseline, and why
    (see selection.py);
The optimizer's state is not stored: CMA-ES is seeded, so replaying its asks and the
journaled fitnesses rebuilds it exactly (see `search.py`).
"""

import contextlib
import errno
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, List, Type, TypeVar

from mergekit_recycle.config_files import write_atomically
from mergekit_recycle.errors import RecycleError, RunDirError
from mergekit_recycle.records import JournalRecord, Record, parse_record

R = TypeVar("R", bound=JournalRecord)


def now() -> str:
    """A record's time: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Journal:
    """An append-only, fsync'ed JSON Lines file.

    Only the process that appends may repair a torn last line; readers (`repair=False`,
    e.g. `mergekit-recycle report` on a running run) skip it, since it may be a line
    being written at that moment.
    """

    def __init__(self, path: Path, repair: bool = True):
        self.path = path
        self.repair = repair
        self.records: List[Record] = list(self._read())

    def _read(self) -> Iterator[Record]:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data) and self.repair:
            # A torn last line: the process died while writing it. The record was never
            # acknowledged, so dropping it loses nothing that was relied upon.
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
                os.fsync(handle.fileno())
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield loads(line)
            except ValueError as exc:
                raise RunDirError(self.path.parent, f"{self.path.name} line {number} {exc}; the journal was edited "
                                  "or damaged: restore it, or rerun with --restart") from None

    def append(self, record: Record) -> Record:
        line = dumps(record)
        # A full disk may leave part of this line: the next open cuts it off, as after a kill.
        with writing(self.path, self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        self.records.append(record)
        return record

    def rewrite(self, records: List[Record]) -> None:
        """Replace the whole journal with `records`, atomically. Only for a run that has evaluated
        nothing (its run record is replaced when a fixed recipe takes it over): the journal of a run
        that has computed something is only ever appended to."""
        with writing(self.path, self.path.parent):
            write_atomically(self.path, "".join(dumps(r) for r in records), durable=True)
        self.records = list(records)

    def of_type(self, kind: Type[R]) -> List[R]:
        """The records of one type, in journal order."""
        return [record for record in self.records if isinstance(record, kind)]


def loads(line: bytes) -> Record:
    """One journal line's record; ValueError that says what is wrong with the line (to follow "line N")."""
    try:
        data = json.loads(line)
    except ValueError:
        raise ValueError("is not JSON") from None
    try:
        return parse_record(data)
    except ValueError as exc:
        raise ValueError(f"is no journal record ({' '.join(str(exc).splitlines()[:2])})") from None


def dumps(record: Record) -> str:
    """One journal line."""
    return json.dumps(record.to_json(), allow_nan=False, separators=(",", ":")) + "\n"


# What to do about a write that failed, by errno: the rest of the message is the same for all.
_FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (or raise the quota)",
          errno.EROFS: "make the run folder writable", errno.EACCES: "make the run folder writable",
          errno.EPERM: "make the run folder writable", errno.ENAMETOOLONG: "choose a shorter --run-dir"}


@contextlib.contextmanager
def writing(path: Path, run_dir: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (a full disk, a read-only folder) into one line that names
    the file; what the journal held before stays, so the same command continues the run once fixed."""
    try:
        yield
    except RecycleError:
        raise  # already one line (some of ours are OSErrors too)
    except OSError as exc:
        raise write_failed(run_dir, path, exc) from None


def write_failed(run_dir: Path, path: Path, exc: BaseException) -> RunDirError:
    """The one-line error for a file of RUN_DIR that could not be written."""
    try:
        name = path.relative_to(run_dir)
    except ValueError:
        name = path
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
    fix = _FIXES.get(getattr(exc, "errno", None), "fix the cause")
    return RunDirError(run_dir, f"writing {name} failed: {reason}; the journal keeps every result so far: "
                       f"{fix}, then rerun the same command to continue")
