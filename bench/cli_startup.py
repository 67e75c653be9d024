"""How long `mergekit-recycle` takes to start, with `merge`'s mergekit options imported lazily (now)
and eagerly (as before: every command paid for peft and transformers).

    .venv/bin/python bench/cli_startup.py [--repeats 7]

Each command is `report` on a folder that does not exist: the CLI starts, fails in one line, exits.
"""

import argparse
import statistics
import subprocess
import sys
import time

COMMAND = ["report", "/nonexistent-run-folder"]
# The same entry point with mergekit.options imported first, as cli.py did at its top before.
EAGER = "import mergekit.options; from mergekit_recycle.cli import main; main()"
LAZY = "from mergekit_recycle.cli import main; main()"


def seconds(code: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *COMMAND], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and "not a mergekit-recycle run folder" in result.stderr, result.stderr
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    seconds(LAZY)  # warm the file cache for both
    times = {"eager (before)": [], "lazy (now)": []}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
        times["eager (before)"].append(seconds(EAGER))
        times["lazy (now)"].append(seconds(LAZY))
    baseline = statistics.median(times["eager (before)"])
    print("| CLI start | median s | min s | ratio |\n|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {statistics.median(values) / baseline:.2f} |")


if __name__ == "__main__":
    main()
