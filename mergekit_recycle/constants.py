"""Environment variables and defaults, parsed in one place."""

import os

_TRUE = {"1", "true", "yes", "on"}


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in _TRUE


# Show full tracebacks instead of the one-line error messages of the CLI.
MERGEKIT_RECYCLE_DEBUG: bool = _env_bool("MERGEKIT_RECYCLE_DEBUG")

def ray_address() -> "str | None":
    """The Ray cluster that `--workers` joins when no --ray-address is given: Ray's own RAY_ADDRESS, read when
    a run starts (None: a local Ray instance is started). It is only read when --workers asks for Ray."""
    return os.environ.get("RAY_ADDRESS", "").strip() or None


# The registered name of our merge method, as written in mergekit YAML files.
RECYCLE_LINEAR = "recycle_linear"



def env_bytes(name: str) -> "int | None":
    """A size in bytes from the environment (`8G`, `512M`, `1000000`); None when unset.

    Parsed when used, not at import, so a bad value is reported as one line by the command
    that needs it; `inf`, `nan`, negative and absurd sizes (over 2**63 bytes) are refused.
    """
    import math

    from mergekit_recycle.errors import SettingError

    value = os.environ.get(name, "").strip().upper().removesuffix("B").removesuffix("I")
    if not value:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = (value[:-1], units[value[-1]]) if value[-1] in units else (value, 1)
    try:
        size = float(number) * unit
    except ValueError:
        size = -1.0
    if not (math.isfinite(size) and 0 <= size < MAX_BYTES):
        raise SettingError(name, os.environ[name], "a size in bytes, e.g. 8G, 512M or 1000000")
    return int(size)


# No machine holds more: a larger size is a typo (and would overflow the sizes computed from it).
MAX_BYTES = 2**63

# The seeds `search.seed` and `optimize --seed` accept. pycma takes seed + 1 (+ 1,000,003 per
# restart), and numpy refuses a seed of 2**32 or more: 2**31 leaves room for 2,000 restarts.
MAX_SEED = 2**31 - 1


# The environment variable that caps how many bytes of checkpoint tensors the optimizer keeps in
# memory; unset means half of the memory available when the run starts. A bigger pool is streamed.
POOL_MEMORY_VARIABLE = "MERGEKIT_RECYCLE_POOL_MEMORY"

# How many candidates may fail in a row before the search stops.
MAX_CONSECUTIVE_FAILURES = 5

# Rows per forward pass when scoring: `auto` measures it once per run (loglikelihoods.choose_batch_size);
# `optimize --batch-size N` sets it. Without log-likelihood requests to measure on, auto takes
# UNMEASURED_BATCH_SIZE: small enough for long prompts and a large vocabulary on a GPU.
DEFAULT_BATCH_SIZE = "auto"
UNMEASURED_BATCH_SIZE = 64


# Escape hatches for the forward work's shortcuts, on by default, each checked on the first candidate
# anyway: packing the continuations of requests that share a context into one row
# (loglikelihoods.py), and multiple-choice acc/acc_norm without lm-eval's per-document Python
# (metrics.py). Off, a candidate is scored as lm-eval scores it (benchmarks compare the two).
SHARED_PREFIX_VARIABLE = "MERGEKIT_RECYCLE_SHARED_PREFIX"
VECTOR_METRICS_VARIABLE = "MERGEKIT_RECYCLE_VECTOR_METRICS"
SCORING_VARIABLES = (SHARED_PREFIX_VARIABLE, VECTOR_METRICS_VARIABLE)  # passed on to Ray workers


def shared_prefix() -> bool:
    return _env_bool(SHARED_PREFIX_VARIABLE, default=True)


def vector_metrics() -> bool:
    return _env_bool(VECTOR_METRICS_VARIABLE, default=True)


# The environment variable that spaces the search state's commits to the Hub during a
# `--resume-from-hub` run (the Hub limits commits per repo and hour); the last one always comes.
SAVE_INTERVAL_VARIABLE = "MERGEKIT_RECYCLE_SAVE_INTERVAL"
DEFAULT_SAVE_INTERVAL = 60.0


def save_interval() -> float:
    """Seconds between two saves of the search state to the Hub (MERGEKIT_RECYCLE_SAVE_INTERVAL)."""
    return env_seconds(SAVE_INTERVAL_VARIABLE, DEFAULT_SAVE_INTERVAL)


# How long a Ray worker may wait to be placed (at the start, or again after its node was lost) before
# the run goes on without it.
RAY_PLACEMENT_VARIABLE = "MERGEKIT_RECYCLE_RAY_PLACEMENT_SECONDS"
DEFAULT_RAY_PLACEMENT_SECONDS = 120.0


def ray_placement_seconds() -> float:
    return env_seconds(RAY_PLACEMENT_VARIABLE, DEFAULT_RAY_PLACEMENT_SECONDS)


def env_seconds(name: str, default: float) -> float:
    """A finite number of seconds >= 0 from the environment; `default` when unset."""
    from mergekit_recycle.errors import SettingError

    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise SettingError(name, value, f"a number of seconds >= 0, e.g. {default:g}")
    return seconds
