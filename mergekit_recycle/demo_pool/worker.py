"""The training step of a demo-pool build, run in a child process that starts pinned.

`python -m mergekit_recycle.demo_pool.worker WORKSPACE SEED` reads the plan (JSON) on stdin,
trains and saves every checkpoint into WORKSPACE, and writes one JSON object a line on stdout:
`{"progress": line}` while it trains, then `{"error": message}` if the build must stop.

It is a child process because the settings that pin the bytes (build.PINNED_ENVIRONMENT; the same
bytes on every AMD x86-64 CPU checked, another build on Intel) are read once, when torch and MKL
first compute: they must be in the environment before the process starts, which a caller that
already used torch cannot undo.
"""

import json
import sys
from pathlib import Path

from mergekit_recycle.demo_pool.build import PoolPlan, train_pool
from mergekit_recycle.errors import DemoPoolError


def main(workspace: str, seed: str) -> int:
    """Train the plan on stdin into `workspace`; 0 when every checkpoint is saved, 2 when not."""

    def report(line: str) -> None:
        print(json.dumps({"progress": line}), flush=True)

    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the parent reports progress; a bar per saved shard is noise
    # Kernels that give one answer whatever the run: none of the nondeterministic ones, and not
    # oneDNN's, which choose their code by the CPU as MKL does (unused by these fp32 models today).
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    plan = PoolPlan.model_validate_json(sys.stdin.read())
    try:
        train_pool(Path(workspace), int(seed), plan, report)
    except DemoPoolError as exc:
        print(json.dumps({"error": exc.message}), flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
