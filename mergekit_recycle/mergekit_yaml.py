"""Proposals as mergekit YAML: the file `mergekit-recycle merge`, or plain `mergekit-yaml` where
mergekit-recycle is installed (plugin.py), turns into the very model the search scored."""

from pathlib import Path
from typing import Any, Dict

import yaml

from mergekit_recycle.config_files import write_atomically
from mergekit_recycle.constants import RECYCLE_LINEAR
from mergekit_recycle.pool import Pool
from mergekit_recycle.proposal import Merge


def merge_config(merge: Merge, pool: Pool, dtype: str) -> Dict[str, Any]:
    """The mergekit configuration of `merge`: recycle_linear over every pool checkpoint, with absolute paths."""
    config: Dict[str, Any] = {"merge_method": RECYCLE_LINEAR}
    if pool.base is not None:
        config["base_model"] = str(pool.base.path)
    config["models"] = [
        {"model": str(checkpoint.path), "parameters": {"weight": float(merge.weights[checkpoint.name])}}
        for checkpoint in pool.checkpoints
    ]
    if pool.base is not None:
        config["parameters"] = {"scale": float(merge.scale)}
    config["dtype"] = dtype
    return config


def write_merge_config(path: Path, merge: Merge, pool: Pool, dtype: str, title: str) -> Path:
    """Write the YAML atomically (a reader never sees half a file), with `title` as its comment.

    The same text is the merged model's mergekit_config.yml, so the comment names no file."""
    text = f"# {title}\n# Reproduce: mergekit-recycle merge THIS_FILE OUT_DIR (or mergekit-yaml THIS_FILE OUT_DIR)\n"
    text += yaml.safe_dump(merge_config(merge, pool, dtype), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, text)
