"""What the pool and the publishing steps share about the Hub: the client, downloads, and
one sentence for each way a Hub call can fail.

The client is huggingface_hub's own, so the endpoint (`HF_ENDPOINT`), the token (`HF_TOKEN`
or `hf auth login`), offline mode (`HF_HUB_OFFLINE`) and the cache (`HF_HOME`,
`HF_HUB_CACHE`) are read where huggingface_hub reads them, and behave as its users expect.
"""

import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, List, Optional

from mergekit_recycle.errors import one_line

# The files of a checkpoint folder that a merge needs, besides its weights.
SUPPORT_FILE = re.compile(r"(.*\.json|.*\.model|tokenizer\.model\.v\d+|.*\.tiktoken|merges\.txt|vocab\.txt|.*\.jinja)$")
REMOTE_CODE_FILE = re.compile(r".*\.py$")
SAFETENSORS_FILE = re.compile(r".*\.safetensors$")
# The pickle weights transformers and mergekit read (not a trainer's optimizer.pt or rng_state.pth).
PICKLE_FILE = re.compile(r"pytorch_model.*\.bin$")


def api():
    """A client for the endpoint huggingface_hub is configured with, with its token."""
    from huggingface_hub import HfApi, constants

    return HfApi(endpoint=constants.ENDPOINT)


def ensure_repo(repo_id: str, private: bool) -> str:
    """Create the model repo when it does not exist yet (private as asked); the head of its main branch.

    Called just before the first commit, never earlier: a run that fails before it has something
    to push leaves nothing on the Hub.
    """
    client = api()
    client.create_repo(repo_id, private=private, exist_ok=True)
    return client.repo_info(repo_id).sha


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def natural_key(text: str) -> List:
    """`step200` before `step1000`: checkpoint names count steps."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def matching(names: Iterable[str], pattern: str, paths: bool = False) -> List[str]:
    """The names a glob matches, in natural order. Over `paths`, `*` stays within one folder level
    (`checkpoint-*` is not `checkpoint-100/ema`) and the root (`""`) is never matched."""
    parts = pattern.split("/")

    def matches(name: str) -> bool:
        if not paths:
            return fnmatchcase(name, pattern)
        names = name.split("/")
        return bool(name) and len(names) == len(parts) and all(map(fnmatchcase, names, parts))

    return sorted({name for name in names if matches(name)}, key=natural_key)


def exact_pattern(path: str) -> str:
    """A path as an allow_patterns entry that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def download(repo: str, sha: str, files: List[str], revision: Optional[str] = None) -> Path:
    """Fetch these files of a pinned commit into the HF cache; the snapshot folder they lie in.

    `revision`, the branch or tag the commit was just resolved from, is cached as pointing at it
    (as huggingface_hub caches it), so that an offline run finds `repo@revision` without the network.
    """
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo, revision=sha, allow_patterns=[exact_pattern(f) for f in files], endpoint=endpoint()))
    if revision is not None and revision != sha:
        ref = _storage(repo) / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
    return snapshot


def _storage(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def cached_snapshot(repo: str, revision: str) -> Path:
    """The cached snapshot folder of `revision` (a commit SHA, or a branch or tag the cache has a ref
    for), without the network. Only part of a snapshot is ever downloaded (one checkpoint's files), so
    huggingface_hub's own offline lookup, which wants whole snapshots, cannot be used."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    storage = _storage(repo)
    ref = storage / "refs" / revision
    sha = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / sha
    if not snapshot.is_dir():
        raise LocalEntryNotFoundError(f"{repo}@{revision} is not in the cache")
    return snapshot


def has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def failure(exc: BaseException, repo: str, revision: Optional[str] = None, offline_hint: bool = True) -> str:
    """What went wrong in a Hub call about `repo`, and how to fix it, in one sentence.

    Never includes the token: huggingface_hub's messages name URLs and the server's message only.
    """
    from huggingface_hub import errors

    at = f"{repo}@{revision}" if revision else repo
    if isinstance(exc, errors.GatedRepoError):
        return f"{repo} is gated: accept its conditions at {endpoint()}/{repo} with the account of your token, then rerun"
    if isinstance(exc, errors.RepositoryNotFoundError):
        hint = ("no Hub token is set: if it is private, set HF_TOKEN or run `hf auth login`" if not has_token()
                else "or your token cannot read it")
        return f"repo {repo} not found on {endpoint()} ({hint})"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo}"
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return f"a file is missing from {at}: {_server_message(exc)}"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return f"{at} is needed from the Hub, but HF_HUB_OFFLINE=1 is set"
    if isinstance(exc, errors.LocalEntryNotFoundError) and offline():
        return (f"{at} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set: run once online "
                "(or with the same HF_HOME as a run that downloaded it)")
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"the Hub answered {status} for {at}: {_server_message(exc)}"
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2"):
        # huggingface_hub also says LocalEntryNotFoundError when a download could not reach the Hub.
        return (f"cannot reach {endpoint()} for {at} ({type(exc).__name__}: {one_line(exc, 300)}); check the network"
                + (", or set HF_HUB_OFFLINE=1 to work from the cache" if offline_hint else ""))
    return f"{at}: {type(exc).__name__}: {exc}"


def _server_message(exc) -> str:
    message = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return " ".join(message.split())
