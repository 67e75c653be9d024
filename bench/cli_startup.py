"""How long `mergekit-recycle` takes to start: now (the package and the CLI import no mergekit; only
`merge` does, when it runs or shows its help), and as before (the package imported mergekit to
register recycle_linear, and listing `merge` in --help imported mergekit's options: peft,
transformers), for the commands a user runs first.

    .venv/bin/python bench/cli_startup.py [--repeats 7]

Each command runs in a fresh interpreter; "before" imports what the old package and --help did
first, then runs the same entry point.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

NOW = "from mergekit_recycle.cli import main; main()"
BEFORE = "import mergekit.options, mergekit_recycle.recycle_linear; from mergekit_recycle.cli import main; main()"


def commands(folder: Path) -> Dict[str, Tuple[List[str], int]]:
    """name: (arguments, the exit status they must give)."""
    recipe = folder / "bad.yaml"
    recipe.write_text("name: x\npool: 5\n")  # refused field by field, before any task is looked up
    return {
        "--help": (["--help"], 0),
        "validate (bad recipe)": (["validate", str(recipe)], 2),
        "report (no run folder)": (["report", str(folder / "no-run")], 2),
        "merge --help": (["merge", "--help"], 0),
    }


def seconds(code: str, arguments: List[str], status: int) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == status, (arguments, result.returncode, result.stderr[-500:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = commands(Path(folder))
        seconds(BEFORE, *runs["--help"])  # warm the file cache
        print("| command | before: median s | now: median s | now: min s | ratio |\n|---|---:|---:|---:|---:|")
        for name, (arguments, status) in runs.items():
            before, now = [], []
            for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
                before.append(seconds(BEFORE, arguments, status))
                now.append(seconds(NOW, arguments, status))
            ratio = statistics.median(now) / statistics.median(before)
            print(f"| {name} | {statistics.median(before):.2f} | {statistics.median(now):.2f} | {min(now):.2f} | "
                  f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
