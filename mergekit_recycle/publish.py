"""Publishing a run's winner to the Hub: one commit with the merged model, its model card, the
plots, and the report and search state (journal.jsonl, search.json) under `recycle/`.

Access is checked before the search starts (`check_push_access`), so that hours of search
never end in a push that cannot happen. The push itself (`publish`) reads only the run
folder, so `mergekit-recycle publish RUN_DIR` can be rerun after a failure, or later.
The token is huggingface_hub's (HF_TOKEN or `hf auth login`); nothing here writes it anywhere.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import yaml

from mergekit_recycle import hub
from mergekit_recycle.checkpoints import Checkpoint
from mergekit_recycle.errors import HubAccessError, PublishError, RunDirError
from mergekit_recycle.hub_state import JOURNAL_FILE, SEARCH_FILE, hub_journal_is_behind, state_files, without_home
from mergekit_recycle.journal import Journal, now
from mergekit_recycle.model_card import build_model_card
from mergekit_recycle.records import PublishRecord, RunRecord
from mergekit_recycle.run_folder import JOURNAL, MERGED, RECIPE_COPY, REPORT_JSON, WINNER, locked

STAGING = "hub-upload"
PLOTS = ("progress.png", "tasks.png", "weights.png")
# Files of an earlier publish that this one replaces when it has no file of that name (a winner
# with fewer shards, say): weights and their indexes at the top of the repo, and recycle/.
STALE = re.compile(r"([^/]+\.safetensors(\.index\.json)?|pytorch_model[^/]*\.bin(\.index\.json)?|recycle/.*)$")
# The search state a --resume-from-hub run keeps in the repo.
STATE_FILES = (JOURNAL_FILE, SEARCH_FILE)


@dataclass(frozen=True)
class Destination:
    """A Hub repo the token was checked to write to."""

    repo_id: str
    private: bool
    user: str


def check_push_access(repo_id: Optional[str], private: bool, default_name: str) -> Destination:
    """Check the token can write to the repo, or create it in its namespace, before any work is done.

    `repo_id` None means `<user>/<default_name>`. A repo that does not exist yet is created only
    with the first commit (hub.ensure_repo), so a run that fails first leaves no empty repo.
    """
    from huggingface_hub.errors import HfHubHTTPError

    target = repo_id or f"<you>/{default_name}"
    if hub.offline():
        raise HubAccessError(target, "HF_HUB_OFFLINE=1 is set; unset it to publish, or pass --no-push and publish "
                             "later with `mergekit-recycle publish RUN_DIR`")
    if not hub.has_token():
        raise HubAccessError(target, "no Hub token: set HF_TOKEN to a token with write access, or run `hf auth login`")
    client = hub.api()
    try:
        who = client.whoami()
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise HubAccessError(target, "the Hub token is invalid or expired; set HF_TOKEN to a valid token "
                                 "with write access") from None
        raise HubAccessError(target, hub.failure(exc, target, offline_hint=False)) from None
    except Exception as exc:  # noqa: BLE001 - unreachable Hub and the like: one line
        raise HubAccessError(target, hub.failure(exc, target, offline_hint=False)) from None
    user = who["name"]
    target = repo_id or f"{user}/{default_name}"
    _check_write_permission(who, target)
    return Destination(repo_id=target, private=private, user=user)


def _check_write_permission(who: Dict[str, Any], repo_id: str) -> None:
    """What whoami says about writing to repo_id: the token's role, the namespace, fine-grained scopes."""
    user, namespace = who["name"], repo_id.split("/")[0]
    token = who.get("auth", {}).get("accessToken", {})
    if token.get("role") == "read":
        raise HubAccessError(repo_id, f"the Hub token of {user} is read-only; create one with write access at "
                             f"{hub.endpoint()}/settings/tokens and set HF_TOKEN to it")
    orgs = {org["name"].lower(): org for org in who.get("orgs") or []}
    if namespace.lower() != user.lower() and namespace.lower() not in orgs:
        names = ", ".join([user] + [org["name"] for org in orgs.values()])
        raise HubAccessError(repo_id, f"the token of {user} can write to {names}, not {namespace}")
    if orgs.get(namespace.lower(), {}).get("roleInOrg") == "read":
        raise HubAccessError(repo_id, f"{user} has the read role in {namespace}: ask an admin of {namespace} for write")
    if token.get("role") == "fineGrained":
        scopes = token.get("fineGrained") or {}
        granted = "repo.write" in (scopes.get("global") or []) or any(
            "repo.write" in (scope.get("permissions") or [])
            and (scope.get("entity") or {}).get("type") in ("user", "org", "model")
            and ((scope.get("entity") or {}).get("name") or "").lower() in (namespace.lower(), repo_id.lower())
            for scope in scopes.get("scoped") or [])
        if not granted:
            raise HubAccessError(repo_id, f"the fine-grained token of {user} has no repo.write permission on "
                                 f"{namespace}; add it at {hub.endpoint()}/settings/tokens")


def publish_defaults(run_dir: Path) -> Dict[str, Any]:
    """hub_repo, private and name, as the run's recipe gave them (recipe.yaml, copied into the run)."""
    defaults: Dict[str, Any] = {"hub_repo": None, "private": True, "name": None}
    copy = run_dir / RECIPE_COPY
    if copy.is_file():
        data = yaml.safe_load(copy.read_text(encoding="utf-8")) or {}
        output = data.get("output") or {}
        defaults.update(hub_repo=output.get("hub_repo"), private=output.get("private", True), name=data.get("name"))
    if defaults["name"] is None:
        defaults["name"] = _run_record(run_dir).recipe
    return defaults


def publish(run_dir: Path, destination: Destination, say: Callable[[str], None] = lambda line: None,
            parent_commit: Optional[str] = None, message: Optional[str] = None,
            note: Optional[Dict[str, Any]] = None):
    """Push the run's winner to destination.repo_id in one commit; its CommitInfo.

    With `parent_commit`, the Hub refuses the commit (HTTP 412, raised as it is) when the repo moved
    on since; `note` adds to the journal's record of the push (publish_policy.Decision.record).
    """
    with locked(run_dir):
        try:
            check_publishable(run_dir)
            try:
                hub.ensure_repo(destination.repo_id, destination.private)
            except Exception as exc:  # noqa: BLE001 - one line, the run folder untouched
                raise PublishError(run_dir, destination.repo_id, hub.failure(exc, destination.repo_id,
                                                                           offline_hint=False)) from None
            # Outside a --resume-from-hub run, the search state goes along only where it loses nothing:
            # publishing an older run folder must not roll back a nightly search kept in the repo.
            with_state = parent_commit is not None or _state_is_behind(run_dir, destination.repo_id)
            if not with_state:
                say(f"the search state in {destination.repo_id} is ahead of {run_dir} or another run's: kept as it is")
            staging = stage(run_dir, destination.repo_id, with_state)
            say(f"pushing {_size(staging)} to {destination.repo_id}")
            commit = _upload(staging, run_dir, destination.repo_id, parent_commit, message,
                             keep=() if with_state else STATE_FILES)
        finally:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
        report = json.loads((run_dir / REPORT_JSON).read_text(encoding="utf-8"))
        Journal(run_dir / JOURNAL).append(PublishRecord(**{
            "repo": destination.repo_id, "commit": commit.oid, "url": commit.commit_url,
            "evaluations": report["evaluations"], "winner": report["winner"]["from"], **(note or {}),
            "time": now()}))
    return commit


def published(run_dir: Path, repo_id: str, report: Dict[str, Any]) -> Optional[str]:
    """The commit URL of the latest push of this very result (same evaluations, same winner) to repo_id."""
    pushes = [r for r in Journal(run_dir / JOURNAL, repair=False).of_type(PublishRecord) if r.repo == repo_id]
    if pushes and (pushes[-1].evaluations, pushes[-1].winner) == (
            report["evaluations"], report.get("winner", {}).get("from")):
        return pushes[-1].url
    return None


def check_publishable(run_dir: Path) -> None:
    """Refuse a run folder without a finished winner, before the Hub is asked anything."""
    _run_record(run_dir)
    written = run_dir / MERGED / "mergekit_config.yml"
    if not written.is_file() or not (run_dir / REPORT_JSON).is_file():
        raise RunDirError(run_dir, f"has no merged model ({MERGED}/): let `mergekit-recycle optimize` finish first")
    winner = run_dir / WINNER
    if not winner.is_file() or winner.read_text(encoding="utf-8") != written.read_text(encoding="utf-8"):
        raise RunDirError(run_dir, f"{MERGED}/ is not the current winner ({WINNER}): rerun `mergekit-recycle "
                          "optimize` with the same recipe and run folder to finish the run first")


def _state_is_behind(run_dir: Path, repo_id: str) -> bool:
    try:
        return hub_journal_is_behind(repo_id, state_files(run_dir)[JOURNAL_FILE])
    except Exception as exc:  # noqa: BLE001
        raise PublishError(run_dir, repo_id, hub.failure(exc, repo_id, offline_hint=False)) from None


def stage(run_dir: Path, repo_id: str, with_state: bool = True) -> Path:
    """RUN_DIR/hub-upload: the repo's content, as hard links where possible (nothing large is copied).
    The run folder was checked publishable (publish does it first)."""
    merged, winner = run_dir / MERGED, run_dir / WINNER
    report = json.loads((run_dir / REPORT_JSON).read_text(encoding="utf-8"))
    run = _run_record(run_dir)
    recipe_path = run_dir / RECIPE_COPY
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""

    staging = run_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "recycle").mkdir(parents=True)
    for file in merged.iterdir():
        if file.is_file() and file.name not in ("README.md", "mergekit_config.yml"):
            _link(file, staging / file.name)
    for name in PLOTS:
        if (run_dir / name).is_file():
            _link(run_dir / name, staging / name)
    (staging / "mergekit_config.yml").write_text(portable_config(winner, run), encoding="utf-8")
    # report.json as report.py wrote it (JSON), and the run record's checkpoints as pool.Checkpoint's JSON.
    rows = [{**row, "error": without_home(row["error"])} if row.get("error") else row for row in report["rows"]]
    public_report = {**report, "rows": rows,
                     "checkpoints": {c["name"]: Checkpoint.model_validate(c).published_source for c in run.checkpoints}}
    (staging / "recycle" / REPORT_JSON).write_text(json.dumps(public_report, indent=2), encoding="utf-8")
    for name, data in state_files(run_dir).items() if with_state else ():
        (staging / name).write_bytes(data)
    if recipe_text:
        (staging / "recycle" / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    build_model_card(report, run, recipe_text, repo_id).save(staging / "README.md")
    return staging


def portable_config(winner: Path, run: RunRecord) -> str:
    """winner.yaml with each checkpoint named by its pinned Hub commit instead of this machine's path."""
    config = yaml.safe_load(winner.read_text(encoding="utf-8"))
    checkpoints = [Checkpoint.model_validate(c) for c in run.checkpoints]
    for model, checkpoint in zip(config["models"], checkpoints):
        model["model"] = checkpoint.published_reference
    if run.base and "base_model" in config:
        config["base_model"] = Checkpoint.model_validate(run.base).published_reference
    title = winner.read_text(encoding="utf-8").splitlines()[0]
    return (f"{title}\n# Reproduce: mergekit-recycle merge mergekit_config.yml OUT_DIR\n"
            + yaml.safe_dump(config, sort_keys=False))


def _upload(staging: Path, run_dir: Path, repo_id: str, parent_commit: Optional[str], message: Optional[str],
            keep: Tuple[str, ...] = ()):
    """One commit of the staging folder (huggingface_hub retries a commit the Hub fails with 5xx)."""
    from huggingface_hub.errors import HfHubHTTPError

    report = json.loads((staging / "recycle" / REPORT_JSON).read_text(encoding="utf-8"))
    message = message or f"mergekit-recycle: the winner of {report['recipe']} ({report['evaluations']} evaluations)"
    staged = {path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file()}
    client = hub.api()
    try:
        stale = [f for f in client.list_repo_files(repo_id, revision=parent_commit)
                 if STALE.match(f) and f not in staged and f not in keep]
        return client.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=message,
                                    delete_patterns=[hub.exact_pattern(f) for f in stale] or None,
                                    parent_commit=parent_commit)
    except HfHubHTTPError as exc:
        if parent_commit is not None and exc.response is not None and exc.response.status_code == 412:
            raise  # the repo moved on: the caller knows whether that was another run
        raise PublishError(run_dir, repo_id, hub.failure(exc, repo_id, offline_hint=False)) from None
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line, the run folder untouched
        raise PublishError(run_dir, repo_id, hub.failure(exc, repo_id, offline_hint=False)) from None


def _run_record(run_dir: Path) -> RunRecord:
    path = run_dir / JOURNAL
    if not path.is_file():
        raise RunDirError(run_dir, f"no {JOURNAL} here: not a mergekit-recycle run folder")
    runs = Journal(path, repair=False).of_type(RunRecord)
    if not runs:
        raise RunDirError(run_dir, "the run never got going: nothing to publish")
    return runs[0]


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 2**20:.1f} MiB"
