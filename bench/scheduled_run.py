"""What keeping the search on the Hub costs: `optimize --resume-from-hub --push`, as the nightly workflow runs it,
against the same search kept in a run folder only.

    .venv/bin/python bench/scheduled_run.py [--budget 100] [--json PATH]

The pool is the demo pool (.toy-pool, built by `make .toy-pool/recipe.yaml`); the output repo lives on the local
Hub-protocol server (tests/hub_server.py) on 127.0.0.1, so the network costs next to nothing: what is measured is our
own work (exporting the journal, each commit, downloading the state, the replay), not the Hub's latency. Every run is
a `mergekit-recycle optimize --quiet` subprocess on a fresh copy of the recipe, with a fresh HF_HOME:

  night 1   local  --budget B in a new run folder: the baseline
            push   --push: the same, publishing the winner once at the end
            hub    --resume-from-hub --push --budget +B: the state saved after the baselines and every generation,
                   the winner published at the end
  night 2   local  the night-1 run folder again, --budget 2B: replays its journal, searches B more
            hub    a fresh runner: --resume-from-hub --push --budget +B: downloads the state, replays, searches B more
  idle      local  the night-2 run folder again, --budget 2B: nothing to search
            hub    a fresh runner, --budget +0: download, replay, decide, nothing to search

Per run: wall seconds, ratio against `local` of the same row, state commits and the bytes of state they carried
(each save uploads the whole journal and search.json). Saves come every generation here
(MERGEKIT_RECYCLE_SAVE_INTERVAL=0, the worst case; by default at most one a minute). At the end it prints what the
workflow would write to $GITHUB_STEP_SUMMARY after night 2.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hub_server import HubServer  # noqa: E402

TOKEN = "hf_bench_writer_0123456789abcdef"
BIN = Path(sys.executable).parent


def checkout(work: Path, name: str, repo: str) -> Path:
    """A recipe for the demo pool in a folder of its own (a runner's checkout)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "pool.yaml").read_text())
    pool = ROOT / ".toy-pool"
    recipe["pool"] = [{"path": str(pool / Path(entry["path"]).name)} for entry in recipe["pool"]]
    recipe["task_paths"] = [str(pool / "tasks")]
    recipe["output"] = {"run_dir": "run", "hub_repo": repo, "private": False}
    folder = work / name
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml"


def optimize(server: HubServer, recipe: Path, home: Path, *flags: str) -> float:
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MERGEKIT_RECYCLE_SAVE_INTERVAL": "0",
           # Any request for another host goes to a dead proxy.
           "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "mergekit-recycle"), "optimize", str(recipe), "--quiet", *flags],
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"optimize {' '.join(flags)} failed: {result.stderr}")
    return seconds


def state_commits(server: HubServer, repo: str, since: int) -> dict:
    commits = server.history(repo)[since:]
    saves = [(sha, title) for sha, title in commits if title.startswith("mergekit-recycle: search state")]
    sizes = [sum(len(data) for name, data in server.files(repo, sha).items()
                 if name in ("recycle/journal.jsonl", "recycle/search.json")) for sha, _ in saves]
    return {"commits": len(commits), "state_commits": len(saves), "state_bytes": sum(sizes),
            "last_journal_bytes": sizes[-1] if sizes else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (ROOT / ".toy-pool" / "recipe.yaml").is_file():
        raise SystemExit("build the demo pool first: make .toy-pool/recipe.yaml")
    budget = args.budget
    rows = []
    with tempfile.TemporaryDirectory() as scratch, HubServer(tokens={TOKEN: ("bench", "write")}) as server:
        work = Path(scratch)
        repo_push, repo_hub = "bench/push-once", "bench/nightly"

        def row(name: str, local: float, others: dict) -> None:
            rows.append({"row": name, "local_s": round(local, 2),
                         **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in others.items()}})

        local_recipe = checkout(work, "local", repo_push)
        local = optimize(server, local_recipe, work / "home-local", "--budget", str(budget), "--no-push")
        push = optimize(server, checkout(work, "push", repo_push), work / "home-push", "--budget", str(budget), "--push")
        hub = optimize(server, checkout(work, "hub-1", repo_hub), work / "home-hub-1", "--budget", f"+{budget}",
                       "--resume-from-hub", "--push")
        night1 = state_commits(server, repo_hub, 0)
        row("night 1", local, {"push_s": push, "push_ratio": push / local, "hub_s": hub, "hub_ratio": hub / local,
                               **night1})

        seen = len(server.history(repo_hub))
        local = optimize(server, local_recipe, work / "home-local", "--budget", str(2 * budget), "--no-push")
        hub = optimize(server, checkout(work, "hub-2", repo_hub), work / "home-hub-2", "--budget", f"+{budget}",
                       "--resume-from-hub", "--push")
        row("night 2", local, {"hub_s": hub, "hub_ratio": hub / local, **state_commits(server, repo_hub, seen)})
        # What the workflow writes to $GITHUB_STEP_SUMMARY after night 2.
        summary = subprocess.run([str(BIN / "mergekit-recycle"), "report", str(work / "hub-2" / "run"), "--summary"],
                                 capture_output=True, text=True, check=True).stdout

        seen = len(server.history(repo_hub))
        local = optimize(server, local_recipe, work / "home-local", "--budget", str(2 * budget), "--no-push")
        hub = optimize(server, checkout(work, "hub-3", repo_hub), work / "home-hub-3", "--budget", "+0",
                       "--resume-from-hub", "--push")
        row("idle", local, {"hub_s": hub, "hub_ratio": hub / local, **state_commits(server, repo_hub, seen)})

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"demo pool, budget {budget} a night; {machine}")
    for entry in rows:
        print(json.dumps(entry))
    print("\n$GITHUB_STEP_SUMMARY after night 2:\n" + summary)
    if args.json:
        args.json.write_text(json.dumps({"budget": budget, "machine": machine, "rows": rows, "summary": summary},
                                        indent=1))


if __name__ == "__main__":
    main()
