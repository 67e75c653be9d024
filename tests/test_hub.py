"""The Hub, end to end: pools pulled from repos, branches and checkpoint folders, pinned to commits;
the winner published with its model card. The real huggingface_hub client talks to our local
Hub-protocol server (tests/hub_server.py) on 127.0.0.1; nothing else is reached."""

import json
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import lines, run_cli
from hub_server import HubServer

WRITE, READ = "hf_write_alice_0123456789abcdef", "hf_read_alice_0123456789abcdef"
FINE_GRAINED, FINE_GRAINED_ELSEWHERE = "hf_fine_alice_0123456789abcdef", "hf_fine_alice_lab_0123456789abcdef"
# `optimize --push` without output.hub_repo pushes to <user>/<recipe name>.
RUN_REPO, SFT_REPO, PUSHED = "lab/tiny-run", "lab/tiny-sft", "alice/hub-recycle"
BRANCHES = {"stage1-step1000": "post-1", "stage1-step2000": "post-2", "stage2-step1000": "post-3"}
FOLDERS = {"checkpoint-100": "post-4", "checkpoint-200": "post-5", "checkpoint-300": "post-6"}
BUDGET = 4


def files_of(folder: Path, prefix: str = "") -> Dict[str, bytes]:
    return {prefix + file.name: file.read_bytes() for file in folder.iterdir() if file.is_file()}


def sharded(state: Dict[str, torch.Tensor]) -> Dict[str, bytes]:
    from safetensors.torch import save

    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    index = {"metadata": {}, "weight_map": {name: shard for shard, members in halves.items() for name in members}}
    return {**{shard: save({name: state[name].contiguous() for name in members}) for shard, members in halves.items()},
            "model.safetensors.index.json": json.dumps(index).encode()}


@pytest.fixture(scope="module")
def hub(small_pool):
    """The Hub as a lab leaves it: a run's checkpoints on branches, an SFT run's in checkpoint-* folders."""
    pool_dir = small_pool[0]
    with HubServer(tokens={WRITE: ("alice", "write"), READ: ("alice", "read"), FINE_GRAINED: ("alice", "fineGrained:alice"),
                           FINE_GRAINED_ELSEWHERE: ("alice", "fineGrained:lab")}, orgs={"alice": []}) as server:
        server.create_repo(RUN_REPO)
        server.commit(RUN_REPO, {"README.md": b"# a pretraining run\n"})
        for branch, checkpoint in BRANCHES.items():
            server.create_branch(RUN_REPO, branch)
            server.commit(RUN_REPO, files_of(pool_dir / checkpoint), branch=branch)
        server.create_tag(RUN_REPO, "v1", "stage2-step1000")
        server.create_branch(RUN_REPO, "stage1-broken")  # a config and no weights: globs pass it by
        server.commit(RUN_REPO, {"config.json": files_of(pool_dir / "post-1")["config.json"]}, branch="stage1-broken")
        server.create_repo(SFT_REPO)
        sft = {"README.md": b"# an SFT run\n", "logs/events.txt": b"no checkpoint here\n"}
        for folder, checkpoint in FOLDERS.items():
            sft |= files_of(pool_dir / checkpoint, f"{folder}/")
            sft[f"{folder}/optimizer.pt"] = b"optimizer state a merge never needs" * 100
        server.commit(SFT_REPO, sft)
        server.create_repo("lab/pickled")
        state = load_file(pool_dir / "post-1" / "model.safetensors")
        pickled = pool_dir.parent / "pickled"
        pickled.mkdir(exist_ok=True)
        torch.save(state, pickled / "pytorch_model.bin")
        server.commit("lab/pickled", {**{k: v for k, v in files_of(pool_dir / "post-1").items()
                                         if k != "model.safetensors"}, **files_of(pickled)})
        server.create_repo("lab/sharded")  # two shards with their index, and a consolidated copy a merge never needs
        server.commit("lab/sharded", {**sharded(state), "consolidated.safetensors": files_of(pool_dir / "post-1")[
            "model.safetensors"], **{k: v for k, v in files_of(pool_dir / "post-2").items() if k != "model.safetensors"}})
        server.create_repo("alice/secret", private=True)
        server.commit("alice/secret", files_of(pool_dir / "post-1"))
        yield server


def write_recipe(folder: Path, small_pool, pool: List[dict], **output) -> Path:
    source = yaml.safe_load((small_pool[0] / "recipe.yaml").read_text())
    recipe = {"name": "hub-recycle", "pool": pool, "tasks": source["tasks"],
              "task_paths": [str(small_pool[0] / "tasks")], "search": {"budget": BUDGET, "seed": 0},
              "output": {"run_dir": str(folder / "run"), "private": False, **output}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


GLOB_POOL = [{"repo": RUN_REPO, "revisions": ["stage1-*"]}, {"repo": SFT_REPO, "subfolders": ["checkpoint-*"]}]


def hub_env(server: HubServer, home: Path, token: str = WRITE, offline: bool = False) -> Dict[str, str]:
    return {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_TOKEN": token or "",
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class Session:
    """CLI calls against the local Hub, keeping every output so the token can be looked for in them."""

    def __init__(self, server: HubServer, home: Path):
        self.server, self.home, self.outputs = server, home, []

    def run(self, *args: str, token: str = WRITE, offline: bool = False, cwd: Path = None) -> subprocess.CompletedProcess:
        result = run_cli(*args, env=hub_env(self.server, self.home, token, offline), cwd=cwd)
        self.outputs += [result.stdout, result.stderr]
        return result


@pytest.fixture(scope="module")
def pushed(hub, small_pool, tmp_path_factory):
    """One search over a pool given by globs, pushed with `optimize --push`: (session, recipe, run folder, result)."""
    root = tmp_path_factory.mktemp("hub-run")
    session = Session(hub, root / "hf-home")
    recipe = write_recipe(root, small_pool, GLOB_POOL)
    result = session.run("optimize", str(recipe), "--push", "--quiet")
    assert result.returncode == 0, result.stderr
    return session, recipe, root / "run", result


@pytest.fixture
def online_client(hub, online_hf, tmp_path):
    """Keyword arguments for huggingface_hub calls in this process, to the local Hub, with a cache of their own."""
    online_hf(hub.url)
    return {"endpoint": hub.url, "cache_dir": tmp_path / "client-cache", "token": WRITE}


def test_pool_globs_resolve_to_pinned_commits_and_only_the_needed_files_are_downloaded(hub, small_pool, tmp_path):
    session = Session(hub, tmp_path / "hf-home")
    recipe = write_recipe(tmp_path, small_pool, GLOB_POOL)
    result = session.run("pull", str(recipe))
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in lines(result.stdout)]
    names = [row[1] for row in rows]
    assert names == [f"{RUN_REPO}@stage1-step1000", f"{RUN_REPO}@stage1-step2000",
                     f"{SFT_REPO}@main/checkpoint-100", f"{SFT_REPO}@main/checkpoint-200", f"{SFT_REPO}@main/checkpoint-300"]
    assert [row[0] for row in rows] == ["pool[0]"] * 2 + ["pool[1]"] * 3
    for (location, name, source, path), sha in zip(rows, [hub.head(RUN_REPO, b) for b in list(BRANCHES)[:2]]
                                                   + [hub.head(SFT_REPO)] * 3):
        repo, revision = name.split("@")[0], name.split("@")[1].split("/")[0]
        assert source.startswith(f"{repo}@{revision}@{sha}")
        assert Path(path).is_dir() and sha in path
        expected = BRANCHES.get(revision) or FOLDERS[name.rsplit("/", 1)[1]]
        assert (Path(path) / "model.safetensors").read_bytes() == (small_pool[0] / expected / "model.safetensors").read_bytes()
    downloaded = {p.name for p in (tmp_path / "hf-home").rglob("*") if p.is_file() or p.is_symlink()}
    assert "optimizer.pt" not in downloaded and "events.txt" not in downloaded
    stage2 = hub.head(RUN_REPO, "stage2-step1000")
    assert not any(stage2 in str(p) for p in (tmp_path / "hf-home").rglob("*")), "a branch outside the glob was downloaded"


@pytest.mark.parametrize("entry, expected", [
    ({"repo": RUN_REPO, "revisions": ["stage9-step1"]},
     ["pool[0]", "revision 'stage9-step1' not found in lab/tiny-run", "stage1-step1000"]),
    ({"repo": RUN_REPO, "revisions": ["stage9-*"]}, ["pool[0]", "matches no branch or tag", "v1"]),
    ({"repo": "lab/no-such-repo"}, ["pool[0]", "repo lab/no-such-repo not found"]),
    ({"repo": SFT_REPO, "subfolders": ["checkpoint-999"]}, ["pool[0]", "subfolder 'checkpoint-999'", "checkpoint-100"]),
    ({"repo": SFT_REPO}, ["pool[0]", "no config.json at its root", "list them under subfolders"]),
    ({"repo": "lab/pickled"}, ["pool[0]", "only pickle weights", "allow_pickle: true"]),
    ({"repo": "alice/secret"}, ["pool[0]", "repo alice/secret not found", "no Hub token is set"]),
    ({"repo": RUN_REPO, "revisions": ["*"], "subfolders": ["nowhere"]}, ["pool[0]", "subfolder 'nowhere' matches no"]),
    ({"repo": RUN_REPO, "revisions": ["stage1-broken"]}, ["pool[0]", "has no model weights"]),
    ({"repo": SFT_REPO, "subfolders": ["./"]}, ["pool[0].subfolders", "leave out subfolders"]),
])
def test_a_bad_hub_entry_fails_with_one_line_naming_it(hub, small_pool, tmp_path, entry, expected):
    recipe = write_recipe(tmp_path, small_pool, [entry, {"repo": RUN_REPO, "revisions": ["v1"]}])
    result = Session(hub, tmp_path / "hf-home").run("pull", str(recipe), token="")
    assert result.returncode == 2 and len(lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith(str(recipe))
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_a_commit_enters_the_pool_once(hub, small_pool, tmp_path):
    session = Session(hub, tmp_path / "hf-home")
    # Tag v1 is the head of stage2-step1000 and main holds no checkpoint: a glob skips main, merges the commit once.
    once = session.run("pull", str(write_recipe(tmp_path / "a", small_pool, [
        {"repo": RUN_REPO, "revisions": ["*"]}, {"repo": SFT_REPO, "subfolders": ["checkpoint-100"]}])))
    assert once.returncode == 0, once.stderr
    assert [line.split("\t")[1] for line in lines(once.stdout)] == [
        f"{RUN_REPO}@stage1-step1000", f"{RUN_REPO}@stage1-step2000", f"{RUN_REPO}@stage2-step1000",
        f"{SFT_REPO}@main/checkpoint-100"]
    head = hub.head(RUN_REPO, "stage2-step1000")
    twice = session.run("pull", str(write_recipe(tmp_path / "b", small_pool, [
        {"repo": RUN_REPO, "revisions": ["v1"]}, {"repo": RUN_REPO, "revisions": [head]}])))
    assert twice.returncode == 2 and len(lines(twice.stderr)) == 1, twice.stderr
    assert f"pool[1]: checkpoint {RUN_REPO}@{head}: is the commit pool[0] resolves to as {RUN_REPO}@v1" in twice.stderr


def test_only_the_shards_an_index_names_are_downloaded(hub, small_pool, tmp_path):
    session = Session(hub, tmp_path / "hf-home")
    result = session.run("pull", str(write_recipe(tmp_path, small_pool, [{"repo": "lab/sharded"},
                                                                           {"repo": RUN_REPO, "revisions": ["v1"]}])))
    assert result.returncode == 0, result.stderr
    folder = Path(lines(result.stdout)[0].split("\t")[3])
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_an_anchor_that_is_a_pool_member_keeps_its_pins(hub, small_pool, tmp_path, online_hf):
    from mergekit_recycle.journal import Journal
    from mergekit_recycle.optimize import RunOptions, earlier_pins, fingerprint, start_session
    from mergekit_recycle.pool import resolve_pool
    from mergekit_recycle.recipe import load_recipe

    online_hf(hub.url)
    path = write_recipe(tmp_path, small_pool, [{"repo": RUN_REPO, "revisions": ["stage2-*"]},
                                               {"repo": SFT_REPO, "subfolders": ["checkpoint-100"]}])
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "base": {"repo": RUN_REPO, "revisions": ["stage2-step1000"]}}))
    recipe = load_recipe(path)
    options = RunOptions(run_dir=tmp_path / "run", budget=1, seed=0, device="cpu")
    first = resolve_pool(recipe, path, pins=earlier_pins(options))
    assert first.base == first.checkpoints[0]
    options.run_dir.mkdir()
    start_session(Journal(options.run_dir / "journal.jsonl"), recipe, first, options, path.read_text())
    hub.commit(RUN_REPO, files_of(small_pool[0] / "post-5"), branch="stage2-step1000", message="moved")
    again = resolve_pool(recipe, path, pins=earlier_pins(options))
    assert again.base == again.checkpoints[0] and fingerprint(recipe, again) == fingerprint(recipe, first)
    assert [c.sha for c in again.inputs] == [c.sha for c in first.inputs]


def test_private_repos_and_pickle_weights_when_allowed(hub, small_pool, tmp_path):
    entries = [{"repo": "alice/secret"}, {"repo": "lab/pickled", "allow_pickle": True}]
    result = Session(hub, tmp_path / "hf-home").run("pull", str(write_recipe(tmp_path, small_pool, entries)), token=READ)
    assert result.returncode == 0, result.stderr
    paths = [Path(line.split("\t")[3]) for line in lines(result.stdout)]
    assert (paths[0] / "model.safetensors").is_file() and (paths[1] / "pytorch_model.bin").is_file()


def test_optimize_pushes_the_winner_with_its_card_and_it_loads_back(pushed, online_client, small_pool, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM

    session, recipe, run_dir, result = pushed
    assert f"published: {session.server.url}/{PUSHED}/commit/" in result.stdout
    folder = Path(snapshot_download(PUSHED, **online_client))
    model = AutoModelForCausalLM.from_pretrained(folder)
    merged = load_file(run_dir / "merged" / "model.safetensors")
    assert all(torch.equal(merged[name], tensor) for name, tensor in model.state_dict().items() if name in merged)
    for name in ["README.md", "mergekit_config.yml", "config.json", "progress.png", "tasks.png", "weights.png",
                 "recycle/report.json", "recycle/journal.jsonl", "recycle/recipe.yaml", "tokenizer.json"]:
        assert (folder / name).is_file(), name

    card = ModelCard.load(PUSHED, token=WRITE)
    assert card.data.base_model == [RUN_REPO, SFT_REPO]
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert {"merge", "mergekit", "mergekit-recycle"} <= set(card.data.tags)
    report = json.loads((run_dir / "report.json").read_text())
    optimized = report["rows"][-1]
    results = {r.dataset_type: r.metric_value for r in card.data.eval_results}
    assert results == {f"toy_{t}_test": round(optimized["holdout"][t], 4) for t in report["tasks"]}
    shas = {hub_sha for hub_sha in [session.server.head(RUN_REPO, "stage1-step1000"), session.server.head(SFT_REPO)]}
    assert all(sha in card.text for sha in shas) and "mergekit-recycle merge mergekit_config.yml out/" in card.text
    assert "| uniform soup |" in card.text and "![objective over the search](progress.png)" in card.text

    journal = [json.loads(line) for line in (folder / "recycle" / "journal.jsonl").read_text().splitlines()]
    assert journal[0]["type"] == "run" and all("path" not in c for c in journal[0]["checkpoints"])
    assert [c["sha"] for c in journal[0]["checkpoints"]][-1] == session.server.head(SFT_REPO)
    assert set(report["checkpoints"].values()) == {c["source"] for c in journal[0]["checkpoints"]}


def test_rerunning_a_pushed_run_pushes_nothing_new(pushed):
    session, recipe, run_dir, result = pushed
    served = len(session.server.requests)
    again = session.run("optimize", str(recipe), "--push", "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"published already, with nothing new since: {session.server.url}/{PUSHED}/commit/" in again.stdout
    assert not [path for method, path, _ in session.server.requests[served:] if "/commit/" in path]


def test_the_published_config_rebuilds_the_same_merge_anywhere(pushed, online_client, tmp_path):
    from huggingface_hub import snapshot_download

    session, recipe, run_dir, result = pushed
    folder = Path(snapshot_download(PUSHED, **online_client))
    config = yaml.safe_load((folder / "mergekit_config.yml").read_text())
    sft = session.server.head(SFT_REPO)
    assert config["models"][2]["model"] == f"hf://{SFT_REPO}@{sft}/checkpoint-100"
    assert config["models"][0]["model"] == f"{RUN_REPO}@{session.server.head(RUN_REPO, 'stage1-step1000')}"
    rebuilt = session.run("merge", str(folder / "mergekit_config.yml"), str(tmp_path / "out"), cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    again, merged = load_file(tmp_path / "out" / "model.safetensors"), load_file(run_dir / "merged" / "model.safetensors")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)


def test_the_token_never_lands_in_a_file_or_a_log(pushed, online_client):
    from huggingface_hub import snapshot_download

    session, recipe, run_dir, result = pushed
    places = [p for p in run_dir.rglob("*") if p.is_file()]
    places += [p for p in Path(snapshot_download(PUSHED, **online_client)).rglob("*") if p.is_file()]
    assert places and not [p for p in places if WRITE.encode() in p.read_bytes()]
    assert session.outputs and not [o for o in session.outputs if WRITE in o]
    assert any(value == f"Bearer {WRITE}" for headers in session.server.seen_headers
               for key, value in headers.items() if key.lower() == "authorization")


def test_a_resumed_run_keeps_its_commits_after_a_branch_moves_and_works_offline(pushed, small_pool):
    session, recipe, run_dir, result = pushed
    server = session.server
    pinned = server.head(RUN_REPO, "stage1-step1000")
    moved = server.commit(RUN_REPO, files_of(small_pool[0] / "post-6"), branch="stage1-step1000", message="moved")
    served = len(server.requests)
    more = session.run("optimize", str(recipe), "--budget", str(BUDGET + 2), "--no-push", "--quiet")
    assert more.returncode == 0, more.stderr
    assert not any(moved in path for _, path, _ in server.requests[served:]), "the moved branch was fetched"
    run = json.loads((run_dir / "journal.jsonl").read_text().splitlines()[0])
    assert run["checkpoints"][0]["sha"] == pinned
    assert json.loads((run_dir / "report.json").read_text())["evaluations"] == BUDGET + 2

    served = len(server.requests)
    offline = session.run("optimize", str(recipe), "--budget", str(BUDGET + 2), "--no-push", "--quiet", offline=True)
    assert offline.returncode == 0, offline.stderr
    assert "| optimized |" in offline.stdout and len(server.requests) == served


def test_offline_without_pins_refuses_patterns_with_one_line(pushed, small_pool, tmp_path):
    session, recipe, run_dir, result = pushed
    other = write_recipe(tmp_path, small_pool, GLOB_POOL)
    refused = session.run("pull", str(other), offline=True)
    assert refused.returncode == 2 and len(lines(refused.stderr)) == 1, refused.stderr
    assert "HF_HUB_OFFLINE=1" in refused.stderr and "'stage1-*' is a pattern" in refused.stderr
    exact = write_recipe(tmp_path / "exact", small_pool, [{"repo": RUN_REPO, "revisions": ["stage1-step2000"]},
                                                          {"repo": SFT_REPO, "subfolders": ["checkpoint-200"]}])
    cached = session.run("pull", str(exact), offline=True)
    assert cached.returncode == 0, cached.stderr
    assert len(lines(cached.stdout)) == 2


@pytest.mark.parametrize("token, message", [
    ("", "no Hub token: set HF_TOKEN"),
    (READ, "the Hub token of alice is read-only"),
    ("hf_not_a_token", "the Hub token is invalid or expired"),
    (FINE_GRAINED_ELSEWHERE, "the fine-grained token of alice has no repo.write permission on alice"),
])
def test_a_push_that_cannot_happen_fails_before_the_first_evaluation(hub, small_pool, tmp_path, token, message):
    recipe = write_recipe(tmp_path, small_pool, GLOB_POOL, hub_repo=PUSHED)
    result = Session(hub, tmp_path / "hf-home").run("optimize", str(recipe), "--quiet", token=token)
    assert result.returncode == 2 and len(lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith(f"cannot publish to {PUSHED}: {message}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf-home" / "hub").exists()


def test_a_push_to_another_namespace_fails_before_the_search(hub, small_pool, tmp_path):
    recipe = write_recipe(tmp_path, small_pool, GLOB_POOL, hub_repo="lab/merged")
    result = Session(hub, tmp_path / "hf-home").run("optimize", str(recipe), "--quiet")
    assert result.returncode == 2 and "the token of alice can write to alice, not lab" in result.stderr


def test_publish_retries_a_failed_commit_and_then_says_how_to_retry(pushed, tmp_path):
    session, recipe, run_dir, result = pushed
    server = session.server
    commit_path = f"/api/models/{PUSHED}/commit/main"
    server.fail_next("POST", commit_path, 500, times=1)
    retried = session.run("publish", str(run_dir), "--quiet")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip().startswith(f"{server.url}/{PUSHED}/commit/")
    # A failure huggingface_hub does not retry (it retries 5xx up to 5 times, for about 30 s).
    server.fail_next("POST", commit_path, 403)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    failed = session.run("publish", str(run_dir), "--repo", PUSHED, "--quiet")
    assert failed.returncode == 1 and len(lines(failed.stderr)) == 1, failed.stderr
    assert f"pushing to {PUSHED} failed" in failed.stderr and f"rerun `mergekit-recycle publish {run_dir}`" in failed.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_republishing_replaces_stale_weights_and_keeps_everything_else(pushed, online_client):
    session, recipe, run_dir, result = pushed
    server = session.server
    server.commit(PUSHED, {"docs/diagram.png": b"png", "original/consolidated.safetensors": b"w",
                           "model-00002-of-00002.safetensors": b"w", "model.safetensors.index.json": b"{}",
                           "recycle/old.json": b"{}"})
    again = session.run("publish", str(run_dir), "--quiet", token=FINE_GRAINED)
    assert again.returncode == 0, again.stderr
    files = set(server.files(PUSHED))
    assert {"docs/diagram.png", "original/consolidated.safetensors", "model.safetensors", "README.md"} <= files
    assert not {"model-00002-of-00002.safetensors", "model.safetensors.index.json", "recycle/old.json"} & files
    for name in ("recycle/journal.jsonl", "recycle/report.json", "mergekit_config.yml"):
        assert str(run_dir.parent) not in server.files(PUSHED)[name].decode(), f"{name} names this machine's paths"


def test_publish_refuses_a_run_without_a_winner(hub, tmp_path):
    result = Session(hub, tmp_path / "hf-home").run("publish", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "not a mergekit-recycle run folder" in result.stderr


def test_the_hub_example_recipe_is_valid(tmp_path):
    example = Path(__file__).parent.parent / "recipes" / "hub-example.yaml"
    result = run_cli("validate", str(example))  # its task names are looked up in lm-eval (~15 s)
    assert result.returncode == 0, result.stderr
    assert "hub " in result.stdout


def tiny_falcon(folder: Path, seed: int = 0) -> Path:
    """A Falcon checkpoint: outside the tested architectures, and mergekit 0.1.5 cannot merge it to disk."""
    from mergekit_recycle.demo_pool import char_tokenizer, save_checkpoint, tiny_causal_lm

    tokenizer = char_tokenizer()
    return save_checkpoint(tiny_causal_lm(tokenizer, seed, "falcon"), tokenizer, folder)


def test_an_untested_architecture_is_refused_from_its_config_before_its_weights_are_downloaded(hub, small_pool, tmp_path):
    hub.create_repo("lab/tiny-falcon")
    hub.commit("lab/tiny-falcon", {**files_of(tiny_falcon(tmp_path / "falcon")),
                                   **files_of(tiny_falcon(tmp_path / "falcon-b", seed=1), "b/")})
    session = Session(hub, tmp_path / "hf-home")
    entries = [{"repo": "lab/tiny-falcon"}, {"repo": "lab/tiny-falcon", "subfolders": ["b"]}]
    result = session.run("pull", str(write_recipe(tmp_path, small_pool, entries)))
    assert result.returncode == 2 and len(lines(result.stderr)) == 1, result.stderr
    assert "pool[0]" in result.stderr and "architecture FalconForCausalLM is not one" in result.stderr
    assert list((tmp_path / "hf-home").rglob("config.json")) and not list((tmp_path / "hf-home").rglob("*.safetensors"))


def test_a_failed_final_merge_leaves_nothing_on_the_hub(hub, small_pool, tmp_path):
    pool = [{"path": str(tiny_falcon(tmp_path / f"falcon-{seed}", seed))} for seed in range(2)]
    recipe = write_recipe(tmp_path, small_pool, pool, hub_repo="alice/falcon-run")
    data = yaml.safe_load(recipe.read_text())
    data["merge"] = {"device": "cpu", "allow_untested_architecture": True}
    data["search"].update(budget=2, population=2)
    recipe.write_text(yaml.safe_dump(data))
    result = Session(hub, tmp_path / "hf-home").run("optimize", str(recipe), "--quiet")
    assert result.returncode == 1 and len(lines(result.stderr)) == 1, result.stderr
    assert "merging the winner into merged/ failed for FalconForCausalLM" in result.stderr
    assert not hub.exists("alice/falcon-run")


def test_a_pythia_style_pool_from_the_hub_scores_what_it_merges(hub, small_pool, tmp_path):
    """GPT-NeoX checkpoints on step* branches (one in Pythia's own layout, with the buffers transformers 5 no
    longer saves) and fine-tunes in subfolders: every checkpoint's journaled scores are lm-eval's on its folder,
    and the winner merges to merged/ (the issue: the output head was never merged, the final merge failed)."""
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from safetensors.torch import save_file

    from mergekit_recycle.demo_pool import char_tokenizer, save_checkpoint, tiny_causal_lm

    tokenizer = char_tokenizer()
    folders = {}
    for seed, name in enumerate(["step1000", "step2000", "checkpoint-1", "checkpoint-2"]):
        folders[name] = save_checkpoint(tiny_causal_lm(tokenizer, seed, "gpt_neox"), tokenizer, tmp_path / "neox" / name)
    weights = folders["step1000"] / "model.safetensors"
    old = load_file(weights)
    for layer in range(2):
        old[f"gpt_neox.layers.{layer}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        old[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(old, weights, metadata={"format": "pt"})
    hub.create_repo("lab/tiny-pythia")
    for branch in ("step1000", "step2000"):
        hub.create_branch("lab/tiny-pythia", branch)
        hub.commit("lab/tiny-pythia", files_of(folders[branch]), branch=branch)
    hub.create_repo("lab/tiny-pythia-sft")
    hub.commit("lab/tiny-pythia-sft", {**files_of(folders["checkpoint-1"], "checkpoint-1/"),
                                       **files_of(folders["checkpoint-2"], "checkpoint-2/")})
    recipe = write_recipe(tmp_path, small_pool, [{"repo": "lab/tiny-pythia", "revisions": ["step*"]},
                                                 {"repo": "lab/tiny-pythia-sft", "subfolders": ["checkpoint-*"]}])
    data = yaml.safe_load(recipe.read_text())
    data["search"].update(budget=2, population=2)
    data["selection"] = {"holdback": 0}  # the search scores every document: comparable with lm-eval's own
    data["merge"] = {"device": "cpu"}
    recipe.write_text(yaml.safe_dump(data))
    result = Session(hub, tmp_path / "hf-home").run("optimize", str(recipe), "--quiet", "--no-push")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finished"] and (run_dir / "merged" / "model.safetensors").is_file()
    run = json.loads((run_dir / "journal.jsonl").read_text().splitlines()[0])
    paths = {checkpoint["name"]: checkpoint["path"] for checkpoint in run["checkpoints"]}
    assert len(paths) == 4
    tasks = {task["name"]: task["search"] for task in data["tasks"]}
    manager = TaskManager(include_path=str(small_pool[0] / "tasks"), include_defaults=False)
    for row in (r for r in report["rows"] if r["kind"] == "checkpoint"):
        results = lm_eval.evaluator.evaluate(HFLM(pretrained=paths[row["name"]], batch_size=16, device="cpu"),
                                             get_task_dict(list(tasks.values()), manager), bootstrap_iters=0,
                                             verbosity="ERROR")
        assert {name: row["search"][name] for name in tasks} == {
            name: results["results"][task]["acc,none"] for name, task in tasks.items()}, row["name"]
