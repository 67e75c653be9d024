"""Shared fixtures: tiny Llama checkpoints and lm-eval tasks built on the spot, all offline."""

import os

# Nothing in the test suite may reach the Hub; set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import settings

from mergekit_recycle import demo_pool

# CI replays the same examples every run, so a red build always reproduces.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

CHECKPOINTS = ["ckpt-a", "ckpt-b", "ckpt-c", "anchor"]


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory) -> Path:
    """Four tiny Llama checkpoints (hidden size 32) with a shared tokenizer, plus tasks."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("pool")
    tokenizer = demo_pool.char_tokenizer()
    for seed, name in enumerate(CHECKPOINTS):
        demo_pool.save_checkpoint(demo_pool.tiny_llama(tokenizer, seed=seed), tokenizer, root / name)
    demo_pool.write_tasks(root / "tasks", demo_pool.evaluation_examples(seed=0, dev_size=20, test_size=20))
    return root


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory):
    """The demo pool at its `small` size, built once through the CLI: (folder, the CLI's result)."""
    directory = tmp_path_factory.mktemp("demo") / "small-pool"
    result = run_cli("demo-pool", str(directory), "--size", "small", "--seed", "0")
    assert result.returncode == 0, result.stderr
    return directory, result


@pytest.fixture
def pool(pool_dir, tmp_path) -> Dict[str, Path]:
    """A private copy of the pool that a test may damage (delete files, edit configs)."""
    copy = tmp_path / "pool"
    shutil.copytree(pool_dir, copy)
    return {name: copy / name for name in CHECKPOINTS} | {"tasks": copy / "tasks", "root": copy}


def run_cli(*args: str, env: Dict[str, str] = None, cwd: Path = None) -> subprocess.CompletedProcess:
    """Run the installed `mergekit-recycle` console script as a user would."""
    script = Path(sys.executable).parent / "mergekit-recycle"
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def invoke(*args: str, env: Dict[str, str] = None):
    """Run the CLI in this process (click's runner): the same command, without a second of
    interpreter start-up per call. The result has exit_code, stdout and stderr."""
    from click.testing import CliRunner

    from mergekit_recycle.cli import cli

    return CliRunner().invoke(cli, list(args), env=env)


def lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


def _refuse_non_loopback(request) -> None:
    """Fail loudly on any request that would leave 127.0.0.1 (e.g. the client's agent-registry fetch)."""
    if request.url.host != "127.0.0.1":
        raise RuntimeError(f"test tried to reach {request.url}")


def _loopback_only_client():
    from huggingface_hub.utils import _http

    client = _http.default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {"request": [_refuse_non_loopback, *hooks["request"]], "response": hooks["response"]}
    return client


@pytest.fixture
def online_hf(monkeypatch, tmp_path):
    """huggingface_hub in this process, online (conftest sets HF_HUB_OFFLINE=1 for everything else) but
    only to 127.0.0.1, with its own cache and no stored token. Call the result with a server URL to make
    it the endpoint (ModelCard.load and the agent registry ignore `endpoint=` arguments)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "AGENT_HARNESSES_PATH": home / "agent_harnesses.json",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    previous_factory = _http._GLOBAL_CLIENT_FACTORY
    _http.set_client_factory(_loopback_only_client)

    def point_at(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    try:
        yield point_at
    finally:
        _http.set_client_factory(previous_factory)
