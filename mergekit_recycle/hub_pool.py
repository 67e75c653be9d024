"""The pool's Hub entries: revisions and subfolders resolved, pinned to commit SHAs, downloaded.

A `repo:` entry names revisions (branches, tags, SHAs, or globs over the branches and tags)
and, optionally, subfolders (paths, or globs over the folders that hold a config.json). Each
match becomes one checkpoint named `repo@revision[/subfolder]` and pinned to the commit its
revision pointed at. The pins are journaled with the run, so a resumed run (or one with
HF_HUB_OFFLINE=1, from the cache alone) merges exactly the commits the run started with,
even if a branch has moved since.
"""

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from mergekit_recycle import hub
from mergekit_recycle.architecture import config_problem, read_architecture, unsupported_reason
from mergekit_recycle.checkpoints import Checkpoint
from mergekit_recycle.errors import PoolError
from mergekit_recycle.recipe import HubCheckpoints
from mergekit_recycle.records import RunRecord

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Pinned:
    """What an earlier session of the run resolved an entry to."""

    entry: Dict[str, Any]  # the entry as the recipe gave it (pins apply only while it is unchanged)
    checkpoints: Tuple[Checkpoint, ...]


def pins_from_run(run: Optional[RunRecord]) -> Dict[str, Pinned]:
    """The pins a journal's `run` record holds, by recipe location (`pool[0]`, `base`)."""
    if run is None or run.entries is None:
        return {}
    # A run record read from the Hub (hub_state.py) names no folders: a pin needs none.
    checkpoints = [Checkpoint.model_validate({"path": ".", **c}) for c in run.checkpoints]
    pins = {location: Pinned(entry, tuple(c for c in checkpoints if c.location == location and c.sha))
            for location, entry in run.entries.items()}
    if run.base and "base" in pins:
        # An anchor that is also a pool member was journaled under the member's location.
        base = Checkpoint.model_validate({"path": ".", **run.base}).model_copy(update={"location": "base"})
        pins["base"] = Pinned(pins["base"].entry, (base,) if base.sha else ())
    return pins


@dataclass
class HubResolver:
    """Resolves `repo:` entries; `pins` (from an earlier session) take precedence over the Hub."""

    pins: Mapping[str, Pinned] = field(default_factory=dict)
    trust_remote_code: bool = False
    # Refuse a checkpoint whose architecture is outside the tested matrix from its config.json,
    # before its weights are downloaded (the pool check refuses it too, once they are).
    refuse_untested: bool = False
    pickle_hint: str = "set `allow_pickle: true` on this entry if you trust it"
    _trees: Dict[Tuple[str, str], List[str]] = field(default_factory=dict)

    def __call__(self, entry: HubCheckpoints, location: str, source: Path) -> List[Checkpoint]:
        def refuse(message: str, at: Optional[str] = None) -> PoolError:
            return PoolError(source, location, at or entry.repo, message)

        pinned = self.pins.get(location)
        if pinned is not None and pinned.checkpoints and pinned.entry == entry.model_dump(mode="json"):
            return [self._fetch(entry, checkpoint, refuse, pinned=True) for checkpoint in pinned.checkpoints]
        if hub.offline():
            matches = self._resolve_from_cache(entry, refuse)
        else:
            matches = self._resolve_online(entry, refuse)
        # A glob can match a branch and a tag at one commit: the same weights, merged once.
        unique = {(sha, folder): (revision, sha, folder) for revision, sha, folder in reversed(matches)}
        checkpoints = [Checkpoint(name=_name(entry.repo, revision, folder), path=Path("."), location=location,
                                  source=_source(entry.repo, revision, sha, folder), repo=entry.repo,
                                  revision=revision, subfolder=folder or None, sha=sha,
                                  allow_pickle=entry.allow_pickle)
                       for revision, sha, folder in matches if unique[(sha, folder)] == (revision, sha, folder)]
        return [self._fetch(entry, checkpoint, refuse) for checkpoint in checkpoints]

    # -- which commits and folders ---------------------------------------------------------

    def _resolve_online(self, entry: HubCheckpoints, refuse) -> List[Tuple[str, str, str]]:
        client = hub.api()
        refs: Optional[Dict[str, str]] = None

        def all_refs() -> Dict[str, str]:
            nonlocal refs
            if refs is None:
                listed = self._call(lambda: client.list_repo_refs(entry.repo), entry, refuse)
                refs = {ref.name: ref.target_commit for ref in list(listed.branches) + list(listed.tags)}
            return refs

        revisions: List[Tuple[str, str, bool]] = []  # (name, commit, matched by a glob)
        for pattern in entry.revisions:
            if hub.is_glob(pattern):
                names = hub.matching(all_refs(), pattern)
                if not names:
                    raise refuse(f"revision pattern {pattern!r} matches no branch or tag "
                                 f"(the repo has: {_listing(all_refs())})")
                revisions += [(name, all_refs()[name], True) for name in names]
            else:
                try:
                    info = client.model_info(entry.repo, revision=pattern)
                except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
                    raise refuse(self._revision_failure(exc, entry, pattern, all_refs)) from None
                revisions.append((pattern, info.sha, False))
        matches, skipped = [], []
        for revision, sha, globbed in _unique(revisions):
            tree = self._tree(entry, sha, refuse)
            try:
                folders = self._folders(entry, revision, _checkpoint_folders(tree), refuse)
                if globbed:  # a glob also matches branches without checkpoints (main, often)
                    folders = [folder for folder in folders if _has_weights(tree, folder)]
                    if not folders:
                        raise refuse(f"{entry.repo}@{revision} has no model weights", f"{entry.repo}@{revision}")
                matches += [(revision, sha, folder) for folder in folders]
            except PoolError as exc:
                if not globbed:
                    raise
                skipped.append(exc)
        if not matches:
            raise skipped[0]
        return matches

    def _resolve_from_cache(self, entry: HubCheckpoints, refuse) -> List[Tuple[str, str, str]]:
        """Offline without pins: exact revisions and subfolders only, found in the HF cache."""
        globs = [p for p in entry.revisions + (entry.subfolders or ()) if hub.is_glob(p)]
        if globs:
            raise refuse(f"HF_HUB_OFFLINE=1 is set and {globs[0]!r} is a pattern: offline, patterns resolve only "
                         "through the pins of an earlier run in the same run folder; run once online, or list "
                         "exact revisions and subfolders")
        matches = []
        for revision in entry.revisions:
            try:
                sha = hub.cached_snapshot(entry.repo, revision).name
            except Exception as exc:  # noqa: BLE001
                raise refuse(hub.failure(exc, entry.repo, revision)) from None
            matches += [(revision, sha, folder) for folder in (entry.subfolders or ("",))]
        return matches

    def _revision_failure(self, exc: Exception, entry: HubCheckpoints, revision: str, all_refs) -> str:
        from huggingface_hub.errors import RevisionNotFoundError

        message = hub.failure(exc, entry.repo, revision)
        if isinstance(exc, RevisionNotFoundError):
            try:
                message += f" (the repo has: {_listing(all_refs())})"
            except PoolError:
                pass
        return message

    def _tree(self, entry: HubCheckpoints, sha: str, refuse) -> List[str]:
        """Every file path of the repo at a commit (a commit never changes, so it is listed once)."""
        from huggingface_hub.hf_api import RepoFile

        key = (entry.repo, sha)
        if key not in self._trees:
            listing = self._call(lambda: list(hub.api().list_repo_tree(entry.repo, revision=sha, recursive=True)),
                                 entry, refuse, sha)
            self._trees[key] = [item.path for item in listing if isinstance(item, RepoFile)]
        return self._trees[key]

    def _folders(self, entry: HubCheckpoints, revision: str, folders: List[str], refuse) -> List[str]:
        at = f"{entry.repo}@{revision}"
        if entry.subfolders is None:
            if "" not in folders:
                hint = f"; its checkpoint folders are {_listing(folders)}: list them under subfolders" if folders else ""
                raise refuse(f"{at} has no config.json at its root{hint}", at)
            return [""]
        chosen: List[str] = []
        for pattern in entry.subfolders:
            names = hub.matching(folders, pattern, paths=True) if hub.is_glob(pattern) else [pattern] if pattern in folders else []
            if not names:
                kind = "subfolder pattern" if hub.is_glob(pattern) else "subfolder"
                raise refuse(f"{kind} {pattern!r} matches no folder with a config.json in {at} "
                             f"(folders with one: {_listing([f or '.' for f in folders])})", at)
            chosen += [name for name in names if name not in chosen]
        return chosen

    # -- the files -----------------------------------------------------------------------

    def _fetch(self, entry: HubCheckpoints, checkpoint: Checkpoint, refuse, pinned: bool = False) -> Checkpoint:
        """The checkpoint with `path` set: its folder in the HF cache, downloaded when online.

        A freshly resolved branch or tag is cached as pointing at its commit, as huggingface_hub
        caches it; a pinned one is not (the branch may have moved on since the run started)."""
        folder = checkpoint.subfolder or ""
        if hub.offline():
            try:
                snapshot = hub.cached_snapshot(checkpoint.repo, checkpoint.sha)
            except Exception as exc:  # noqa: BLE001
                raise refuse(hub.failure(exc, checkpoint.repo, checkpoint.sha), checkpoint.name) from None
            path = snapshot / folder
            if not (path / "config.json").is_file():
                raise refuse(f"{checkpoint.source} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set: "
                             "run once online", checkpoint.name)
        else:
            files = self._files(entry, checkpoint, refuse)
            if self.refuse_untested:
                self._check_architecture(entry, checkpoint, refuse)
            ref = None if pinned else checkpoint.revision
            snapshot = self._call(lambda: hub.download(checkpoint.repo, checkpoint.sha, files, ref), entry, refuse,
                                  checkpoint.sha)
            path = snapshot / folder
        return checkpoint.model_copy(update={"path": path})

    def _files(self, entry: HubCheckpoints, checkpoint: Checkpoint, refuse) -> List[str]:
        folder = checkpoint.subfolder or ""
        names = [posixpath.basename(p) for p in self._tree(entry, checkpoint.sha, refuse)
                 if posixpath.dirname(p) == folder]
        weights = [n for n in names if hub.SAFETENSORS_FILE.match(n)]
        if SAFETENSORS_INDEX in names:
            # Only the shards the index names: a folder may also hold a consolidated copy.
            weights = [SAFETENSORS_INDEX] + self._shards(entry, checkpoint, folder, refuse)
        if not weights:
            pickles = [n for n in names if hub.PICKLE_FILE.match(n)]
            if pickles and not entry.allow_pickle:
                raise refuse(f"has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                             + self.pickle_hint, checkpoint.name)
            weights = pickles + [n for n in names if n == "pytorch_model.bin.index.json"]
        if not weights:
            raise refuse("has no model weights (model.safetensors or pytorch_model.bin)", checkpoint.name)
        support = [n for n in names if hub.SUPPORT_FILE.match(n)
                   or (self.trust_remote_code and hub.REMOTE_CODE_FILE.match(n))]
        return [posixpath.join(folder, n) for n in _unique(weights + support)]

    def _check_architecture(self, entry: HubCheckpoints, checkpoint: Checkpoint, refuse) -> None:
        from huggingface_hub import hf_hub_download

        config = self._call(lambda: hf_hub_download(checkpoint.repo, posixpath.join(checkpoint.subfolder or "", "config.json"),
                                                    revision=checkpoint.sha, endpoint=hub.endpoint()),
                            entry, refuse, checkpoint.sha)
        try:
            reason = unsupported_reason(read_architecture(Path(config).parent))
        except (OSError, ValueError) as exc:
            reason = config_problem(exc)
        if reason is not None:
            raise refuse(reason, checkpoint.name)

    def _shards(self, entry: HubCheckpoints, checkpoint: Checkpoint, folder: str, refuse) -> List[str]:
        from huggingface_hub import hf_hub_download

        index = self._call(lambda: hf_hub_download(checkpoint.repo, posixpath.join(folder, SAFETENSORS_INDEX),
                                                   revision=checkpoint.sha, endpoint=hub.endpoint()),
                           entry, refuse, checkpoint.sha)
        try:
            weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(shard, str) and "/" not in shard for shard in shards):
                raise ValueError("its weight_map must map tensor names to shard files of its folder")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise refuse(f"{SAFETENSORS_INDEX} of {checkpoint.source} is not a safetensors index ({exc})",
                         checkpoint.name) from None
        return shards

    def _call(self, call, entry: HubCheckpoints, refuse, revision: Optional[str] = None):
        try:
            return call()
        except PoolError:
            raise
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line naming the entry
            raise refuse(hub.failure(exc, entry.repo, revision)) from None


def _checkpoint_folders(paths: List[str]) -> List[str]:
    """Folders (`""` for the root) that hold a config.json."""
    return sorted({posixpath.dirname(p) for p in paths if posixpath.basename(p) == "config.json"}, key=hub.natural_key)


def _has_weights(tree: List[str], folder: str) -> bool:
    names = [posixpath.basename(p) for p in tree if posixpath.dirname(p) == folder]
    return any(hub.SAFETENSORS_FILE.match(n) or hub.PICKLE_FILE.match(n) for n in names)


def _name(repo: str, revision: str, folder: str) -> str:
    return f"{repo}@{revision}" + (f"/{folder}" if folder else "")


def _source(repo: str, revision: str, sha: str, folder: str) -> str:
    return f"{repo}@{revision}@{sha}" + (f"/{folder}" if folder else "")


def _unique(items: List) -> List:
    return list(dict.fromkeys(items))


def _listing(names, shown: int = 8) -> str:
    names = sorted(names, key=hub.natural_key)
    text = ", ".join(names[:shown]) or "nothing"
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def fetch_reference(repo: str, revision: str, subfolder: Optional[str], source: Path, location: str,
                    trust_remote_code: bool = False) -> Checkpoint:
    """One checkpoint named the way a mergekit YAML names it (see Checkpoint.reference), fetched."""
    from pydantic import ValidationError

    try:
        entry = HubCheckpoints(repo=repo, revisions=(revision,), subfolders=(subfolder,) if subfolder else None)
    except ValidationError as exc:
        raise PoolError(source, location, repo, exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    resolver = HubResolver(trust_remote_code=trust_remote_code,
                           pickle_hint="convert them to safetensors, or download the checkpoint and name its folder")
    return resolver(entry, location, source)[0]
