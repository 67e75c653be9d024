"""The run folder: its layout (every file name in one place) and who may write it.

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
import fcntl
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from mergekit_recycle.errors import RunDirError, shorten
from mergekit_recycle.journal import Journal
from mergekit_recycle.records import EvaluationRecord

JOURNAL = "journal.jsonl"
PROPOSALS = "proposals"
# The recipe as the latest session was given it: what `publish` cards and pushes.
RECIPE_COPY = "recipe.yaml"
# CMA-ES's state after the latest generation: what a replay of the journal must reach again.
SEARCH_STATE = "search.json"
# The winner as a mergekit YAML.
WINNER = "winner.yaml"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# The winner merged to disk, and where it is written first.
MERGED = "merged"
MERGED_PARTIAL = "merged.partial"
LOCK = ".lock"


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
    with open(run_dir / LOCK, "w") as handle:
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
        return journal.is_file() and bool(Journal(journal, repair=False).of_type(EvaluationRecord))
    except Exception:  # noqa: BLE001 - the user's original error is the one to report
        return True


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run out of the way (for --restart): nothing computed is deleted."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    os.replace(run_dir, target)
    return target


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



def read_search_state(run_dir: Path) -> Optional[Dict[str, Any]]:
    """search.json: CMA-ES's state after the last generation journaled (None before the first)."""
    path = run_dir / SEARCH_STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise RunDirError(run_dir, f"{SEARCH_STATE} is not JSON: delete it (the journal alone resumes the run)") from None
