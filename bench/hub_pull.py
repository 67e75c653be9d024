"""What pulling a pool from the Hub costs: `mergekit-recycle pull` against the other ways to get the same checkpoints.

    .venv/bin/python bench/hub_pull.py [--checkpoints 6] [--branches 2] [--weights-mib 32] [--repeats 3] [--json PATH]

The repo, built in memory and served on 127.0.0.1 by the local Hub-protocol server (tests/hub_server.py), is an HF
Trainer run pushed with hub_strategy="all_checkpoints": on main, K `checkpoint-<step>` folders, each with
model.safetensors (random bfloat16 tensors, a Llama layout of about --weights-mib MiB, at least 21.8: the embeddings
and one layer), config.json (LlamaForCausalLM), generation_config.json, the tokenizer (tokenizer.json,
tokenizer.model, tokenizer_config.json, special_tokens_map.json) and the Trainer's extras: optimizer.pt (Adam's two
moments, 2x the weights), scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin; plus README.md and a
TensorBoard log. B branches `stage1-step*` hold one checkpoint each at their root (weights, config, tokenizer,
training_args.bin). The pool is all K + B checkpoints (a recipe needs two entries or more).

Each method runs in subprocesses with a fresh HF_HOME (so huggingface_hub reads its settings afresh); rounds
interleave the methods:
  hf            `hf download REPO`, then `hf download REPO --revision B` per branch: the baseline, what a user runs;
  mergekit      mergekit's own `ModelReference.local_path()` for REPO and each REPO@B (it lists the files, then
                downloads tokenizer.model, *.json, *.safetensors); it cannot address a subfolder, so this is what
                it would fetch, not a pool it could merge;
  ours          `mergekit-recycle pull` of {repo, subfolders: [checkpoint-*]} + {repo, revisions: [stage1-*]};
  ours warm     the same command again on the cache it filled;
  ours offline  HF_HUB_OFFLINE=1 on that cache, the same folders and branches named exactly (offline, globs
                resolve only through a run journal's pins).
Per method: bytes added to the cache's blobs/, requests the server answered (the hf CLI's one
/api/agent-harnesses probe per process left out), wall time (median of --repeats) and ratios against hf. `startup`
times the interpreter and the imports doing nothing, to size what of the wall time is not the pull.

The test server hashes a file (git sha1; sha256 for LFS files) whenever it lists or serves it; the real Hub stores
those hashes, so they are memoized here and computed before the first method. Requests for any host but 127.0.0.1
go to a dead proxy (127.0.0.1:9), and the hf CLI's PyPI update check is off.
"""

import argparse
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hub_server  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO, TOKEN, BIN = "lab/llama-sft", "hf_bench_reader_0123456789abcdef", Path(sys.executable).parent
VOCAB, HIDDEN, INTERMEDIATE = 8000, 512, 1408
PROBE = "/api/agent-harnesses"
# The Hub stores every file's git oid and sha256; the test server hashes the file on every listing and download.
hub_server.lfs_info = functools.lru_cache(maxsize=None)(hub_server.lfs_info)
hub_server.git_blob_sha1 = functools.lru_cache(maxsize=None)(hub_server.git_blob_sha1)


def pickled(obj) -> bytes:
    torch.save(obj, buffer := io.BytesIO())
    return buffer.getvalue()


def weights(mib: float, seed: int) -> dict:
    """A Llama state dict in bfloat16 with as many layers as bring it near `mib` MiB."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    layer = {**{f"self_attn.{p}_proj.weight": (HIDDEN, HIDDEN) for p in "qkvo"},
             "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
             "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), "input_layernorm.weight": (HIDDEN,),
             "post_attention_layernorm.weight": (HIDDEN,)}
    layer_bytes = 2 * sum(torch.Size(s).numel() for s in layer.values())
    layers = max(1, round((mib * 2**20 - 4 * VOCAB * HIDDEN) / layer_bytes))
    shapes |= {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in layer.items()}
    return {name: torch.randn(shape, generator=g, dtype=torch.bfloat16) for name, shape in shapes.items()}


def checkpoint(state: dict, step: int, trainer: bool) -> dict:
    """The files of one checkpoint folder, as transformers' Trainer saves them."""
    layers = 1 + max(int(n.split(".")[2]) for n in state if n.startswith("model.layers."))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "max_position_embeddings": 2048, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
    vocab = {f"tok{i}": i for i in range(VOCAB)}
    files = {"config.json": json.dumps(config, indent=2).encode(), "model.safetensors": save(state),
             "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
             "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}).encode(),
             "tokenizer.model": bytes(range(256)) * 2000, "special_tokens_map.json": b'{"eos_token": "</s>"}',
             "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}',
             "training_args.bin": pickled({"learning_rate": 2e-5, "output_dir": "out", "seed": 42, "step": step})}
    if trainer:
        moments = {i: {"step": torch.tensor(float(step)), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
                   for i, t in enumerate(state.values())}
        history = [{"step": s, "loss": 2.0 / (1 + s / 500), "learning_rate": 2e-5} for s in range(10, step + 1, 10)]
        files |= {"optimizer.pt": pickled({"state": moments, "param_groups": [{"lr": 2e-5, "params": list(moments)}]}),
                  "scheduler.pt": pickled({"last_epoch": step, "_last_lr": [2e-5]}),
                  "rng_state.pth": pickled({"cpu": torch.get_rng_state(), "python": step}),
                  "trainer_state.json": json.dumps({"global_step": step, "log_history": history}, indent=2).encode()}
    return files


def build_repo(server: HubServer, folders: int, branches: int, mib: float) -> tuple:
    """Commit the run to the server; (folder names, branch names, bytes in main + branches, bytes of a model.safetensors)."""
    server.create_repo(REPO)
    names, refs = [f"checkpoint-{500 * (i + 1)}" for i in range(folders)], [f"stage1-step{1000 * (i + 1)}" for i in range(branches)]
    total = 0  # bytes committed
    for i, branch in enumerate(refs):
        server.create_branch(REPO, branch)  # from the initial commit: the branch holds its checkpoint only
        files = checkpoint(weights(mib, seed=1000 + i), 1000 * (i + 1), trainer=False)
        server.commit(REPO, files, branch=branch)
        total += sum(map(len, files.values()))
    main = {"README.md": b"# llama-sft\nA Trainer run, every checkpoint pushed.\n",
            "runs/Nov26_10-00-00/events.out.tfevents.1764150000.host": bytes(300_000)}
    for i, name in enumerate(names):
        main |= {f"{name}/{path}": data for path, data in checkpoint(weights(mib, seed=i), 500 * (i + 1), trainer=True).items()}
    server.commit(REPO, main)
    total += sum(map(len, main.values()))
    for ref in ["main", *refs]:  # hash every file now, so that no method pays for it
        for path, data in server.files(REPO, ref).items():
            hub_server.git_blob_sha1(data), hub_server.is_lfs(path, data) and hub_server.lfs_info(data)
    return names, refs, total, len(main[f"{names[0]}/model.safetensors"])


def env_for(server: HubServer, home: Path, offline: bool = False) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and "proxy" not in k.lower()}
    dead = "http://127.0.0.1:9"
    return {**clean, "HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HTTP_PROXY": dead,
            "HTTPS_PROXY": dead, "ALL_PROXY": dead, "NO_PROXY": "127.0.0.1,localhost"}


def blob_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "hub").glob("models--*/blobs/*") if p.is_file())


def timed(server: HubServer, home: Path, commands: list, offline: bool = False, pool: int = 0) -> dict:
    """Run the commands one after the other; bytes added to blobs/, requests served, wall seconds.
    `pool`: the last command must print that many lines (`pull` prints one a checkpoint)."""
    before_bytes, before_requests = blob_bytes(home) if home.exists() else 0, len(server.requests)
    start = time.perf_counter()
    for command in commands:
        result = subprocess.run(command, env=env_for(server, home, offline), capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")
    if pool and len(result.stdout.splitlines()) != pool:
        raise SystemExit(f"expected {pool} checkpoints from {' '.join(map(str, command))}, got:\n{result.stdout}")
    seconds = time.perf_counter() - start
    served = server.requests[before_requests:]
    kinds = {"HEAD file": 0, "GET file": 0, "API": 0}
    for method, path, _ in served:
        if path != PROBE:
            kinds[f"{method} file" if "/resolve/" in path else "API"] += 1
    return {"bytes": blob_bytes(home) - before_bytes, "requests": sum(kinds.values()), **kinds,
            "probes": sum(path == PROBE for _, path, _ in served), "seconds": seconds,
            "errors": sum(status >= 400 and path != PROBE for _, path, status in served)}


def hf_download(server, home, refs, **_) -> dict:
    hf = str(BIN / "hf")
    return timed(server, home, [[hf, "download", REPO]] + [[hf, "download", REPO, "--revision", r] for r in refs])


def mergekit_pattern(server, home, refs, **_) -> dict:
    code = ("import sys; from mergekit.common import ModelReference\n"
            "for name in sys.argv[1:]: ModelReference.parse(name).local_path()")
    return timed(server, home, [[sys.executable, "-c", code, REPO, *(f"{REPO}@{r}" for r in refs)]])


def ours(server, home, recipes, refs, **_) -> dict:
    return timed(server, home, [[str(BIN / "mergekit-recycle"), "pull", str(recipes["globs"])]], pool=recipes["size"])


def ours_offline(server, home, recipes, **_) -> dict:
    return timed(server, home, [[str(BIN / "mergekit-recycle"), "pull", str(recipes["exact"])]], offline=True,
                 pool=recipes["size"])


# (name, function, whether it starts from the cache the method before it left, what startup times: the
# interpreter and the imports, doing nothing; for ours the modules `pull` imports)
METHODS = [("hf", hf_download, False, [str(BIN / "hf"), "download", "--help"]),
           ("mergekit", mergekit_pattern, False, [sys.executable, "-c", "import mergekit.common"]),
           ("ours", ours, False, [sys.executable, "-c", "import mergekit_recycle.cli, mergekit_recycle.optimize, "
                                  "mergekit_recycle.pool, mergekit_recycle.hub_pool"]),
           ("ours warm", ours, True, None),  # the same command again on the cache the cold pull filled
           ("ours offline", ours_offline, True, None)]


def write_recipes(folder: Path, names: list, refs: list) -> dict:
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    recipes = {"size": len(names) + len(refs)}
    for kind, pool in {"globs": [{"repo": REPO, "subfolders": ["checkpoint-*"]}, {"repo": REPO, "revisions": ["stage1-*"]}],
                       "exact": [{"repo": REPO, "subfolders": names}, {"repo": REPO, "revisions": refs}]}.items():
        recipe = {"name": "bench-pull", "pool": pool, "task_paths": [str(folder / "tasks")],
                  "tasks": [{"name": "t", "search": "t_dev", "holdout": "t_test", "metric": "acc"}],
                  "output": {"run_dir": str(folder / "run")}}
        recipes[kind] = folder / f"{kind}.yaml"
        recipes[kind].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=6, help="checkpoint-* folders on main (K)")
    parser.add_argument("--branches", type=int, default=2, help="stage1-step* branches, one checkpoint each (>= 1)")
    parser.add_argument("--weights-mib", type=float, default=32, help="about this many MiB of weights per checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.checkpoints < 1 or args.branches < 1:
        parser.error("--checkpoints and --branches must be >= 1 (a recipe needs two entries)")

    runs, load_before = {name: [] for name, *_ in METHODS}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hub-pull-") as tmp, HubServer(tokens={TOKEN: ("bench", "read")}) as server:
        start = time.perf_counter()
        names, refs, repo_bytes, weights_bytes = build_repo(server, args.checkpoints, args.branches, args.weights_mib)
        built = time.perf_counter() - start
        recipes = write_recipes(Path(tmp), names, refs)
        startups = {name: [] for name, _, _, command in METHODS if command}
        for round_ in range(args.repeats):
            for name, _, _, command in METHODS:
                if command:
                    startups[name].append(timed(server, Path(tmp) / "none", [command])["seconds"])
            for name, method, reuse, _ in METHODS:
                home = Path(tmp) / (f"home-ours-{round_}" if name.startswith("ours") else f"home-{name}-{round_}")
                if not reuse:
                    shutil.rmtree(home, ignore_errors=True)
                    shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
                runs[name].append(method(server, home, refs=refs, recipes=recipes))
            for home in Path(tmp).glob("home-*"):
                shutil.rmtree(home)
        unhandled = [request for request in server.unhandled if request[1] != PROBE]
        if server.server_errors or unhandled:
            raise SystemExit(f"server trouble: {server.server_errors[:3]} {unhandled[:3]}")

    table = {name: {**{k: statistics.median(r[k] for r in rs) for k in rs[0]}, "all_seconds": [r["seconds"] for r in rs]}
             for name, rs in runs.items()}
    startup = {name: statistics.median(seconds) for name, seconds in startups.items()}
    base = table["hf"]
    machine = {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    print(f"machine: {machine['platform']}, {machine['cores']} cores, python {machine['python']}; server on 127.0.0.1; "
          f"load average {load_before:.2f} before, {machine['load_after']:.2f} after")
    print(f"repo: {args.checkpoints} checkpoint folders on main + {args.branches} branches, {repo_bytes / 2**20:.0f} MiB "
          f"in all; one model.safetensors is {weights_bytes / 2**20:.1f} MiB; built in {built:.1f} s")
    print(f"medians over {args.repeats} rounds; ratios are method / hf\n")
    print("| method | MiB downloaded | ratio | requests (HEAD / GET / API) | ratio | wall s (all) | ratio | startup s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        ratio = lambda key: f"{row[key] / base[key]:.3f}" if base[key] else "-"  # noqa: E731
        spread = ", ".join(f"{s:.2f}" for s in row["all_seconds"])
        print(f"| {name} | {row['bytes'] / 2**20:.1f} | {ratio('bytes')} | {row['requests']:.0f} ({row['HEAD file']:.0f} / "
              f"{row['GET file']:.0f} / {row['API']:.0f}) | {ratio('requests')} | {row['seconds']:.2f} ({spread}) | "
              f"{ratio('seconds')} | {format(startup[name], '.2f') if name in startup else '-'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                         "repo_bytes": repo_bytes, "weights_bytes": weights_bytes, "startup": startups, "runs": runs, "table": table}, indent=1))


if __name__ == "__main__":
    main()
