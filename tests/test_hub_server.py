"""The local Hub (tests/hub_server.py) driven through the real huggingface_hub client, endpoint by endpoint."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.hf_api import RepoFolder
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HfUriError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import HubError, HubServer, git_blob_sha1, lfs_info

TOKENS = {
    "hf_write_alice": ("alice", "write"),
    "hf_read_alice": ("alice", "read"),
    "hf_write_bob": ("bob", "write"),
}
ORGS = {"alice": ["acme"]}


@pytest.fixture
def hub(online_hf) -> Iterator[HubServer]:
    """A running HubServer, with the client online, loopback-only, and kept away from ~/.cache and stored tokens."""
    with HubServer(TOKENS, ORGS) as server:
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token="hf_write_alice")


def _status(error: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return error.value.response.status_code


def _tree(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_direct_setup_helpers(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    folder = _tree(tmp_path / "ckpt", {"config.json": "{}", "sub/w.bin": "w"})
    files = {"ckpt": folder, "top.txt": b"t", "single.json": folder / "config.json"}
    sha = hub.commit("alice/model", files)
    assert hub.files("alice/model") == {
        ".gitattributes": hub.files("alice/model")[".gitattributes"],
        "ckpt/config.json": b"{}",
        "ckpt/sub/w.bin": b"w",
        "single.json": b"{}",
        "top.txt": b"t",
    }
    dev = hub.commit("alice/model", {}, branch="dev", delete=["top.txt"])
    assert hub.head("alice/model", "dev") == dev and "top.txt" not in hub.files("alice/model", "dev")
    assert "top.txt" in hub.files("alice/model", sha) and hub.head("alice/model") == sha
    assert hub.create_tag("alice/model", "v1", sha) == sha == hub.head("alice/model", "refs/tags/v1")
    assert hub.create_branch("alice/model", "old", "v1") == sha
    with pytest.raises(HubError):
        hub.create_repo("alice/model")
    with pytest.raises(HubError):
        hub.head("alice/model", "nope")
    assert hub.requests == []


def test_create_repo_answers_like_the_hub(hub: HubServer, api: HfApi) -> None:
    url = api.create_repo("alice/model")
    assert (url.repo_id, url.endpoint) == ("alice/model", hub.url)
    assert list(hub.files("alice/model")) == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("alice/model")
    assert _status(conflict) == 409
    assert api.create_repo("alice/model", exist_ok=True).repo_id == "alice/model"
    assert api.create_repo("acme/shared", private=True).repo_id == "acme/shared"
    assert api.model_info("acme/shared").private is True

    with pytest.raises(HfHubHTTPError) as other_namespace:
        api.create_repo("bob/model")
    assert _status(other_namespace) == 403
    reader = HfApi(endpoint=hub.url, token="hf_read_alice")
    with pytest.raises(HfHubHTTPError) as read_only:
        reader.create_repo("alice/fresh")
    assert _status(read_only) == 403 and "read-only" in str(read_only.value)
    # 403 + exist_ok makes the client check repo_info, then build RepoUrl without its endpoint: off huggingface.co
    # that raises HfUriError (a ValueError) even though the repo exists.
    with pytest.raises(HfUriError):
        reader.create_repo("alice/model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(endpoint=hub.url, token=False).create_repo("alice/other")
    assert _status(anonymous) == 401
    assert ("POST", "/api/repos/create", 409) in hub.requests


def test_upload_folder_then_list_tree_and_paths(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo("alice/model")
    folder = _tree(tmp_path / "up", {"config.json": "{}", "a/b.txt": "b", "a/c/d.safetensors": "weights"})
    info = api.upload_folder(repo_id="alice/model", folder_path=folder, commit_message="add files")
    assert info.oid == hub.head("alice/model")
    assert hub.files("alice/model")["a/c/d.safetensors"] == b"weights"

    entries = {e.path: e for e in api.list_repo_tree("alice/model", recursive=True)}
    assert sorted(entries) == [".gitattributes", "a", "a/b.txt", "a/c", "a/c/d.safetensors", "config.json"]
    weights = entries["a/c/d.safetensors"]
    assert weights.blob_id == git_blob_sha1(b"weights") and weights.size == 7
    assert weights.lfs is not None and weights.lfs.sha256 == lfs_info(b"weights")["oid"]
    assert entries["a/b.txt"].lfs is None and isinstance(entries["a"], RepoFolder)
    assert [e.path for e in api.list_repo_tree("alice/model")] == [".gitattributes", "a", "config.json"]
    assert [e.path for e in api.list_repo_tree("alice/model", "a")] == ["a/b.txt", "a/c"]
    expanded = list(api.list_repo_tree("alice/model", "a/c", expand=True))
    assert expanded[0].last_commit.oid == info.oid and expanded[0].last_commit.title == "add files"
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("alice/model", "missing"))

    paths = api.get_paths_info("alice/model", ["config.json", "a", "nope"])
    assert [(type(p).__name__, p.path) for p in paths] == [("RepoFile", "config.json"), ("RepoFolder", "a")]
    assert sorted(api.list_repo_files("alice/model")) == [p for p in sorted(entries) if p not in ("a", "a/c")]
    assert not hub.unhandled


def test_refs_branches_tags_and_info_by_revision(hub: HubServer, api: HfApi) -> None:
    api.create_repo("alice/model")
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="v.txt", repo_id="alice/model").oid
    api.create_branch("alice/model", branch="dev")
    api.create_branch("alice/model", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch("alice/model", branch="dev")
    assert _status(exists) == 409
    api.create_tag("alice/model", tag="v1")
    second = api.upload_file(path_or_fileobj=b"2", path_in_repo="v.txt", repo_id="alice/model", revision="dev").oid
    api.create_branch("alice/model", branch="old", revision=first)

    refs = api.list_repo_refs("alice/model", include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"dev": second, "main": first, "old": first}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first)]
    assert refs.converts == [] and refs.pull_requests == []

    assert api.model_info("alice/model", revision="dev").sha == second
    assert api.model_info("alice/model", revision="v1").sha == first
    by_sha = api.model_info("alice/model", revision=first, files_metadata=True)
    assert by_sha.sha == first and {s.rfilename: s.size for s in by_sha.siblings}["v.txt"] == 1
    assert api.repo_info("alice/model", expand=["sha", "private"]).sha == first
    assert [c.commit_id for c in api.list_repo_commits("alice/model", revision="dev")][:2] == [second, first]

    api.delete_branch("alice/model", branch="old")
    api.delete_tag("alice/model", tag="v1")
    refs = api.list_repo_refs("alice/model")
    assert [b.name for b in refs.branches] == ["dev", "main"] and refs.tags == []


def test_download_follows_branch_and_pins_by_sha(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    old = hub.commit("alice/model", {"config.json": b"v1", "w.safetensors": b"\0" * 64})
    path = hf_hub_download("alice/model", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c1", token=False)
    assert Path(path).read_bytes() == b"v1" and old in path

    new = hub.commit("alice/model", {"config.json": b"v2"})
    latest = hf_hub_download("alice/model", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c1", token=False)
    assert Path(latest).read_bytes() == b"v2" and new in latest
    pinned = hf_hub_download(
        "alice/model", "config.json", revision=old, endpoint=hub.url, cache_dir=tmp_path / "c2", token=False
    )
    assert Path(pinned).read_bytes() == b"v1"
    assert ("GET", f"/alice/model/resolve/{old}/config.json", 200) in hub.requests

    url = hf_hub_url("alice/model", "w.safetensors", endpoint=hub.url)
    metadata = get_hf_file_metadata(url, token=False)
    assert (metadata.commit_hash, metadata.size) == (new, 64)
    assert metadata.etag == lfs_info(b"\0" * 64)["oid"]
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=60-"})) as response:
        assert (response.status, response.read()) == (206, b"\0" * 4)
        assert response.headers["Content-Range"] == "bytes 60-63/64"


def test_snapshot_download_with_allow_patterns(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    hub.commit("alice/model", {"config.json": b"{}", "w.safetensors": b"w", "notes/x.md": b"x"})
    dev = hub.commit("alice/model", {"tokenizer.json": b"tok"}, branch="dev")
    folder = snapshot_download(
        "alice/model",
        revision="dev",
        allow_patterns=["*.json", "notes/*"],
        endpoint=hub.url,
        cache_dir=tmp_path / "cache",
        token=False,
    )
    assert sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()) == [
        "config.json",
        "notes/x.md",
        "tokenizer.json",
    ]
    assert Path(folder).name == dev
    assert (tmp_path / "cache" / "models--alice--model" / "refs" / "dev").read_text() == dev
    assert not hub.unhandled and not hub.server_errors


def test_errors_map_to_client_exceptions(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    hub.create_repo("alice/secret", private=True)
    hub.create_repo("bob/model")
    anonymous = HfApi(endpoint=hub.url, token=False)
    bob = HfApi(endpoint=hub.url, token="hf_write_bob")
    for client, repo_id in [(api, "alice/missing"), (anonymous, "alice/secret"), (bob, "alice/secret")]:
        with pytest.raises(RepositoryNotFoundError):
            client.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", ".gitattributes", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/model", "f", revision="nope", endpoint=hub.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        hf_hub_download("alice/model", "nope.bin", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert isinstance(missing.value, EntryNotFoundError)

    upload = dict(path_or_fileobj=b"x", path_in_repo="x.txt")
    with pytest.raises(HfHubHTTPError) as no_token:
        anonymous.upload_file(repo_id="alice/model", **upload)
    assert _status(no_token) == 401
    with pytest.raises(HfHubHTTPError) as read_token:
        HfApi(endpoint=hub.url, token="hf_read_alice").upload_file(repo_id="alice/model", **upload)
    assert _status(read_token) == 403
    with pytest.raises(HfHubHTTPError) as foreign:
        api.upload_file(repo_id="bob/model", **upload)
    assert _status(foreign) == 403 and "bob" in str(foreign.value)
    with pytest.raises(HfHubHTTPError) as bad_token:
        HfApi(endpoint=hub.url, token="hf_unknown").model_info("alice/model")
    assert _status(bad_token) == 401
    assert ".gitattributes" in hub.files("alice/model") and "x.txt" not in hub.files("alice/model")


def test_whoami_reports_user_orgs_and_role(hub: HubServer) -> None:
    writer = HfApi(endpoint=hub.url, token="hf_write_alice").whoami()
    assert (writer["name"], writer["auth"]["accessToken"]["role"]) == ("alice", "write")
    assert [org["name"] for org in writer["orgs"]] == ["acme"]
    assert HfApi(endpoint=hub.url).whoami(token="hf_read_alice")["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as invalid:
        HfApi(endpoint=hub.url).whoami(token="hf_nobody")
    assert _status(invalid) == 401
    assert hub.seen_headers[0]["authorization"] == "Bearer hf_write_alice"


def test_private_repo_is_readable_by_its_owners(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("alice/secret", private=True)
    hub.create_repo("acme/secret", private=True)
    for repo_id in ("alice/secret", "acme/secret"):
        hub.commit(repo_id, {"f.txt": repo_id.encode()})
        reader = HfApi(endpoint=hub.url, token="hf_read_alice")
        assert reader.model_info(repo_id).private is True
        path = hf_hub_download(repo_id, "f.txt", endpoint=hub.url, cache_dir=tmp_path, token="hf_read_alice")
        assert Path(path).read_bytes() == repo_id.encode()
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token="hf_write_bob").model_info("acme/secret")


def test_upload_folder_delete_patterns_and_path_in_repo(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    hub.commit("alice/model", {"ckpt/old.bin": b"o", "ckpt/keep.json": b"k", "top.bin": b"t"})
    folder = _tree(tmp_path / "new", {"new.bin": "n", "keep.json": "k2"})
    api.upload_folder(repo_id="alice/model", folder_path=folder, path_in_repo="ckpt", delete_patterns=["*.bin"])
    files = hub.files("alice/model")
    assert {p: files[p] for p in files if p != ".gitattributes"} == {
        "ckpt/new.bin": b"n",
        "ckpt/keep.json": b"k2",
        "top.bin": b"t",
    }
    assert ("GET", "/api/models/alice/model/tree/main", 200) in hub.requests


def test_create_commit_parent_commit_branch_and_folder_delete(hub: HubServer, api: HfApi) -> None:
    hub.create_repo("alice/model")
    base = hub.commit("alice/model", {"a/x.txt": b"x", "a/y.txt": b"y", "b.txt": b"b"})
    hub.create_branch("alice/model", "dev")
    stale = hub.commit("alice/model", {"b.txt": b"b2"})
    with pytest.raises(HfHubHTTPError) as race:
        api.create_commit(
            "alice/model",
            [CommitOperationAdd("c.txt", b"c")],
            commit_message="racy",
            parent_commit=base,
        )
    assert _status(race) == 412 and hub.head("alice/model") == stale
    info = api.create_commit(
        "alice/model",
        [CommitOperationDelete("a/"), CommitOperationAdd("c.txt", b"c")],
        commit_message="on dev",
        revision="dev",
        parent_commit=base,
    )
    assert hub.head("alice/model", "dev") == info.oid
    assert sorted(hub.files("alice/model", "dev")) == [".gitattributes", "b.txt", "c.txt"]
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("alice/model", [CommitOperationAdd("d", b"d")], commit_message="m", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/model", [CommitOperationDelete("ghost.txt")], commit_message="m")


def test_fail_next_is_surfaced_or_retried(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo("alice/model")
    commit_path = "/api/models/alice/model/commit/main"
    head = hub.head("alice/model")
    hub.fail_next("POST", commit_path, 500)
    with pytest.raises(HfHubHTTPError) as failed:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/model")
    assert _status(failed) == 500 and hub.head("alice/model") == head

    hub.fail_next("POST", commit_path, 503)
    api.upload_folder(repo_id="alice/model", folder_path=_tree(tmp_path / "f", {"y.txt": "y"}))
    assert hub.files("alice/model")["y.txt"] == b"y"
    commits = [status for method, path, status in hub.requests if path == commit_path]
    assert commits == [500, 503, 200]


def test_model_card_load_through_patched_default_endpoint(hub: HubServer, online_hf) -> None:
    hub.create_repo("alice/model")
    hub.commit("alice/model", {"README.md": b"---\nlicense: mit\n---\n# Card\n"})
    online_hf(hub.url)
    card = ModelCard.load("alice/model", token=False)
    assert card.data.license == "mit" and "# Card" in card.text


def test_normal_flows_hit_only_known_routes(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo("alice/model")
    api.upload_folder(repo_id="alice/model", folder_path=_tree(tmp_path / "f", {"README.md": "hi", "w.bin": "w"}))
    snapshot_download("alice/model", endpoint=hub.url, cache_dir=tmp_path / "cache", token="hf_write_alice")
    assert api.file_exists("alice/model", "w.bin") and not api.file_exists("alice/model", "nope")
    assert api.repo_exists("alice/model") and not api.revision_exists("alice/model", "nope")
    assert hub.unhandled == [] and hub.server_errors == []
    assert not any("xet" in path for _, path, _ in hub.requests)
    assert [request for request in hub.requests if request[2] >= 400] == [
        ("HEAD", "/alice/model/resolve/main/nope", 404),
        ("GET", "/api/models/alice/model/revision/nope", 404),
    ]



def test_unknown_routes_and_lfs_commits_are_refused_clearly(hub: HubServer) -> None:
    hub.create_repo("alice/model")
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(f"{hub.url}/api/models/alice/model/xet-read-token/main")
    assert unknown.value.code == 404 and "no route" in unknown.value.headers["X-Error-Message"]
    assert hub.unhandled == [("GET", "/api/models/alice/model/xet-read-token/main")]

    lfs_line = b'{"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "00", "size": 1}}\n'
    request = urllib.request.Request(
        f"{hub.url}/api/models/alice/model/commit/main",
        data=b'{"key": "header", "value": {"summary": "s"}}\n' + lfs_line,
        headers={"Authorization": "Bearer hf_write_alice", "Content-Type": "application/x-ndjson"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400 and "lfsFile" in refused.value.headers["X-Error-Message"]
