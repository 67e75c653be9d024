"""The `mergekit-recycle` command line.

Every error raised on purpose (RecycleError) becomes one line on stderr and an exit
status (2 for input the user can fix); MERGEKIT_RECYCLE_DEBUG=1 shows the traceback.
"""

import json
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Tuple, Union

import click

from mergekit_recycle import __version__, constants
from mergekit_recycle.demo_pool.build import DESIGNS, SIZES
from mergekit_recycle.errors import RecycleError


def render_error(exc: BaseException) -> str:
    """One line: our own messages say what went wrong and how to fix it."""
    if isinstance(exc, RecycleError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}; rerun with MERGEKIT_RECYCLE_DEBUG=1 for the traceback"
    return " ".join(text.split())


class LazyCommand(click.Command):
    """A command built on first use, by `build`: listed in the group's help by its short help alone.

    `merge` declares mergekit's own options, whose import (peft, transformers) would cost every
    other command, and `mergekit-recycle --help`, seconds at start.
    """

    def __init__(self, name: str, build: Callable[[], click.Command], short_help: str):
        super().__init__(name, short_help=short_help)
        self._build = build
        self._command: Optional[click.Command] = None

    @property
    def command(self) -> click.Command:
        if self._command is None:
            self._command = self._build()
        return self._command

    def make_context(self, info_name: Optional[str], args: list, parent: Optional[click.Context] = None,
                     **extra: Any) -> click.Context:
        # The context names the real command, so the group invokes (and --help shows) that one.
        return self.command.make_context(info_name, args, parent=parent, **extra)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        return self.command.main(*args, **kwargs)


class RecycleGroup(click.Group):
    """A click group that maps our errors to one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except RecycleError as exc:
            self._fail(ctx, exc, exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - anything else still gets one line
            self._fail(ctx, exc, 1)

    @staticmethod
    def _fail(ctx: click.Context, exc: BaseException, code: int) -> NoReturn:
        if constants.MERGEKIT_RECYCLE_DEBUG:
            raise exc
        click.echo(render_error(exc), err=True)
        ctx.exit(code)


@click.group(cls=RecycleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-recycle")
def cli() -> None:
    """Recycle a pool of checkpoints into one better model with mergekit."""


MERGE_SUMMARY = "Merge CONFIG_FILE (any mergekit YAML) into OUT_PATH, with recycle_linear available."


def recipe_argument(ctx: click.Context, param: click.Parameter, path: Path) -> Path:
    """RECIPE_FILE, refused in one line when it is a folder (click's own check prints its usage text,
    three lines), with the recipe inside it as a hint; any other unreadable path is left to
    load_recipe, which names it."""
    import os

    from mergekit_recycle.errors import RecipeError

    if os.path.isdir(path):
        hint = f"; did you mean {path / 'recipe.yaml'}?" if os.path.isfile(path / "recipe.yaml") else ""
        raise RecipeError(path, "", f"is a folder, not a recipe file: give the recipe's YAML file{hint}")
    return path


# The recipe file argument of validate, pull and optimize.
RECIPE = {"type": click.Path(path_type=Path), "callback": recipe_argument}


def merge_command() -> click.Command:
    """`merge`, with mergekit's options (imported here: seconds of peft and transformers)."""
    from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

    # A path, not click.Path(dir_okay=False): a folder or a missing file is merge_yaml's one line.
    @click.command("merge", cls=PrettyPrintHelp, help=f"{MERGE_SUMMARY}\n\nTakes the same options as mergekit-yaml; "
                   "Hub references are fetched as pool entries are.")
    @click.argument("config_file", type=click.Path(path_type=Path))
    @click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
    @add_merge_options
    def merge(merge_options: MergeOptions, config_file: Path, out_path: Path) -> None:
        from mergekit_recycle.merge import merge_yaml

        merge_options.apply_global_options()
        merge_yaml(config_file, out_path, merge_options)

    return merge


cli.add_command(LazyCommand("merge", merge_command, MERGE_SUMMARY))


@cli.command("validate")
@click.argument("recipe_file", **RECIPE)
@click.option(
    "--check-tasks/--no-check-tasks",
    default=True,
    show_default=True,
    help="Look every search and holdout task up in lm-eval (local task_paths first; "
    "lm-eval's own tasks take about 15 s more to index).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
def validate_command(recipe_file: Path, check_tasks: bool, as_json: bool) -> None:
    """Check RECIPE_FILE and print the plan it resolves to."""
    from mergekit_recycle.architecture import describe_architectures
    from mergekit_recycle.recipe import describe_recipe, load_recipe

    recipe = load_recipe(recipe_file)
    # pool.py imports mergekit (seconds): only once the recipe's own fields are known to be right.
    from mergekit_recycle.pool import local_architectures

    architectures = local_architectures(recipe, recipe_file)
    notes = []
    if check_tasks:
        from mergekit_recycle.evaluate import check_tasks_exist

        notes = check_tasks_exist(recipe, recipe_file, uncached_ok=True)
    if as_json:
        click.echo(json.dumps(recipe.model_dump(mode="json"), indent=2))
    else:
        click.echo(describe_recipe(recipe, recipe_file))
        click.echo(describe_architectures(architectures))
    for note in notes:  # on stderr, so that --json stays JSON
        click.echo(note, err=True)


@cli.command("demo-pool")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Seed of the whole pool.")
@click.option("--size", type=click.Choice(SIZES), default="default", show_default=True,
              help="'small' trains less and asks fewer questions (for tests).")
@click.option("--design", type=click.Choice(DESIGNS), default=DESIGNS[0], show_default=True,
              help="What the pool holds. forgetting: post-training runs that each forget what they do not "
              "rehearse; experts: one-skill experts from a partly trained base; trajectory: one run's "
              "checkpoints every few hundred steps and two annealed ends; dominant: one checkpoint best "
              "at everything (no headroom); broken: forgetting plus one diverged checkpoint; close: "
              "near-equal checkpoints, some tied on dev (little headroom); qwen2: "
              "forgetting on a tied-embedding Qwen2.")
@click.option("--quiet", is_flag=True, help="Print only the summary table.")
def demo_pool_command(directory: Path, seed: int, size: str, design: str, quiet: bool) -> None:
    """Build the demo pool in DIRECTORY: tiny Llama checkpoints (Qwen2 for --design qwen2) that
    trade three skills off, their lm-eval tasks and recipe.yaml. Offline and deterministic; a
    no-op when DIRECTORY already holds the same pool."""
    from mergekit_recycle.demo_pool import build_pool, summary_table

    report = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    summary = build_pool(directory, seed=seed, size=size, report=report, design=design)
    click.echo(summary_table(summary))
    click.echo(f"recipe: {directory / 'recipe.yaml'} (the pool took {summary.build_seconds:.0f} s to build)")


@cli.command("pull")
@click.argument("recipe_file", **RECIPE)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the commits this run was pinned to (default: the recipe's output.run_dir).")
def pull_command(recipe_file: Path, run_dir: Optional[Path]) -> None:
    """Resolve RECIPE_FILE's pool, pin each checkpoint to a commit, download it and check it can be merged.

    Prints one line a checkpoint: its name, repo@revision@sha and folder. Use it to fill the
    Hugging Face cache before an HF_HUB_OFFLINE=1 run.
    """
    from mergekit_recycle.optimize import RunOptions, earlier_pins
    from mergekit_recycle.pool import resolve_pool
    from mergekit_recycle.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    options = RunOptions(run_dir=(run_dir or recipe.output.run_dir).absolute(), budget=1, seed=0, device="cpu")
    pool = resolve_pool(recipe, recipe_file, pins=earlier_pins(options))
    for checkpoint in pool.inputs:
        role = "  (anchor)" if checkpoint == pool.base else ""
        click.echo(f"{checkpoint.location}\t{checkpoint.name}\t{checkpoint.source}\t{checkpoint.path}{role}")


class Duration(click.ParamType):
    """A time span: `90` (seconds), `45s`, `30m`, `2h`, `1h30m`."""

    name = "duration"
    _UNITS = {"h": 3600, "m": 60, "s": 1}

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text, total, number = str(value).strip().lower(), 0.0, ""
        try:
            for char in text:
                if char in self._UNITS:
                    total += float(number) * self._UNITS[char]
                    number = ""
                else:
                    number += char
            total += float(number) if number else 0.0
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 2h, 90m, 1h30m, 45s)", param, ctx)
        if not text or total <= 0:
            self.fail(f"{value!r} is not a positive duration (e.g. 2h, 90m, 1h30m, 45s)", param, ctx)
        return total


class Budget(click.ParamType):
    """Proposals to evaluate: `200` (the run's total) or `+50` (on top of what the run has evaluated)."""

    name = "budget"

    def convert(self, value: Any, param, ctx) -> Tuple[int, bool]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        increment = text.startswith("+")
        number = text[1:] if increment else text
        if not (number.isascii() and number.isdigit()) or (int(number) < 1 and not increment):
            self.fail(f"{value!r} is not a budget: a number of evaluations (200), or +N to add N to the run's", param, ctx)
        return int(number), increment


class BatchSizeOption(click.ParamType):
    """Rows per forward pass when scoring: a number, or `auto` (measured once per run)."""

    name = "batch_size"

    def convert(self, value: Any, param, ctx) -> Union[int, str]:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            self.fail(f"{value!r} is not a batch size: a positive number of rows, or auto", param, ctx)
        return int(text)


@cli.command("optimize")
@click.argument("recipe_file", **RECIPE)
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the journal, proposals and report go (default: the recipe's output.run_dir).")
@click.option("--budget", type=Budget(), help="Proposals to evaluate in all, or +N: N more than the run has "
              "evaluated (default: the recipe's search.budget).")
@click.option("--seed", type=click.IntRange(0, constants.MAX_SEED), help="Seed of CMA-ES and the task subsets (default: search.seed).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to merge and score (default: the recipe's merge.device; auto takes a GPU when there is one).")
@click.option("--time-budget", type=Duration(), help="Stop the search in time to score the winner and write the report "
              "before this much time has passed (e.g. 2h, 90m).")
@click.option("--restart", is_flag=True, help="Move an earlier run in the run folder aside and start over.")
@click.option("--batch-size", type=BatchSizeOption(), default=constants.DEFAULT_BATCH_SIZE, show_default=True,
              help="Rows per forward pass when scoring. auto: on a GPU the largest that fits, on a CPU the "
              "throughput plateau, measured once per run (a resumed run keeps its choice on the same hardware).")
@click.option("--push/--no-push", default=None,
              help="Publish the winner to the Hub (to output.hub_repo, else <you>/<recipe name>). "
              "Default: push when the recipe sets output.hub_repo. Access is checked before the search.")
@click.option("--resume-from-hub", is_flag=True,
              help="Keep the search in the output repo's recycle/ folder: continue the search saved there, save it "
              "after every generation, and with --push publish a new model only when its holdout objective beats the "
              "published one (for scheduled runs on ephemeral runners).")
@click.option("--workers", type=click.IntRange(min=1), help="Evaluate each generation on this many Ray workers at "
              "once (one per GPU on CUDA; needs `pip install 'mergekit-recycle[ray]'`). Starts a local Ray instance, "
              "or joins --ray-address / RAY_ADDRESS. Default: no Ray, one candidate at a time in this process.")
@click.option("--ray-address", help="Join this Ray cluster (e.g. 10.0.0.1:6379, or auto) and evaluate on its "
              "workers: --workers of them, else one per GPU (or per --cpus-per-worker CPUs).")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), help="CPU threads of each Ray worker (default: the "
              "CPUs shared out among the workers; 1 on GPU workers).")
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines (for CI logs).")
def optimize_command(recipe_file: Path, run_dir: Optional[Path], budget: Optional[Tuple[int, bool]],
                     seed: Optional[int], device: Optional[str], time_budget: Optional[float], restart: bool,
                     batch_size: Union[int, str], push: Optional[bool], resume_from_hub: bool, workers: Optional[int],
                     ray_address: Optional[str], cpus_per_worker: Optional[int], quiet: bool) -> None:
    """Search the best linear merge of RECIPE_FILE's pool with CMA-ES, then report it against the baselines.

    Rerun the same command to continue a run that stopped; raise --budget to search further.
    """
    started = time.monotonic()  # the time budget counts from here
    from mergekit_recycle.evaluate import check_tasks_exist
    from mergekit_recycle.optimize import RunOptions, optimize
    from mergekit_recycle.recipe import load_recipe
    from mergekit_recycle.report import table

    if cpus_per_worker is not None and workers is None and ray_address is None:
        raise click.UsageError("--cpus-per-worker sets the threads of Ray workers: give --workers N or --ray-address too")
    recipe = load_recipe(recipe_file)
    check_tasks_exist(recipe, recipe_file)
    pushing = bool(push or (push is None and recipe.output.hub_repo))
    destination, hub_state = None, None
    if pushing or resume_from_hub:
        from mergekit_recycle.publish import check_push_access

        destination = check_push_access(recipe.output.hub_repo, recipe.output.private, recipe.name)
    if resume_from_hub:
        from mergekit_recycle.hub_state import HubState

        hub_state = HubState.read(destination.repo_id, destination.private)
    count, increment = budget or (recipe.search.budget, False)
    options = RunOptions(
        run_dir=(run_dir or recipe.output.run_dir).absolute(),
        budget=count,
        budget_is_increment=increment,
        seed=recipe.search.seed if seed is None else seed,
        device=device or recipe.merge.device,
        time_budget=time_budget,
        restart=restart,
        batch_size=batch_size,
        started=started,
        workers=workers,
        ray_address=ray_address,
        cpus_per_worker=cpus_per_worker,
    )
    say = quiet_say(quiet)
    report = optimize(recipe, recipe_file, options, say=say, progress=not quiet, hub_state=hub_state)
    click.echo(table(report, splits=("holdout",)))
    click.echo(holdout_summary(report))
    merged = "winner" in report and hub_state is None  # a run on the Hub merges its winner only to publish it
    click.echo(f"report: {options.run_dir / 'report.md'}" + (f"; merged model: {options.run_dir / 'merged'}" if merged else ""))
    if hub_state is not None:
        from mergekit_recycle.optimize import merge_winner
        from mergekit_recycle.publish_policy import conclude
        from mergekit_recycle.resident_merge import resolve_device

        click.echo(conclude(hub_state, options.run_dir, report, destination, pushing, say, lambda: merge_winner(
            options.run_dir, resolve_device("auto" if options.uses_ray else options.device),
            trust_remote_code=recipe.merge.trust_remote_code)))
    elif destination is not None:
        from mergekit_recycle.publish import publish, published

        if "winner" not in report:
            click.echo(f"nothing published to {destination.repo_id}: no merge was scored", err=True)
        elif (earlier := published(options.run_dir, destination.repo_id, report)) is not None:
            click.echo(f"published already, with nothing new since: {earlier}")
        else:
            click.echo(f"published: {publish(options.run_dir, destination, say).commit_url}")


@cli.command("publish")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", "repo_id", help="The Hub repo, org/name (default: the recipe's output.hub_repo, "
              "else <you>/<recipe name>).")
@click.option("--private/--public", default=None, help="Visibility of a repo this creates (default: the recipe's "
              "output.private, which defaults to private). An existing repo keeps its visibility.")
@click.option("--quiet", is_flag=True, help="Print only the commit URL.")
def publish_command(run_dir: Path, repo_id: Optional[str], private: Optional[bool], quiet: bool) -> None:
    """Push the winner of RUN_DIR to the Hub: the merged model, a model card, the plots, the journal and report.

    Safe to rerun: each run is one commit of the same files.
    """
    from mergekit_recycle.publish import check_publishable, check_push_access, publish, publish_defaults
    from mergekit_recycle.recipe import RepoId
    from pydantic import TypeAdapter, ValidationError

    if repo_id is not None:
        try:
            TypeAdapter(RepoId).validate_python(repo_id)
        except ValidationError:
            raise click.BadParameter(f"{repo_id!r} is not a Hub repo id of the form org/name", param_hint="--repo")
    check_publishable(run_dir)
    defaults = publish_defaults(run_dir)
    destination = check_push_access(repo_id or defaults["hub_repo"],
                                    defaults["private"] if private is None else private, defaults["name"])
    click.echo(publish(run_dir, destination, quiet_say(quiet)).commit_url)


def quiet_say(quiet: bool) -> Callable[[str], None]:
    """Where progress lines go: stderr, or nowhere with --quiet (Hub download and upload bars too)."""
    if not quiet:
        return lambda line: click.echo(line, err=True)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    return lambda line: None


def holdout_summary(report: dict) -> str:
    from mergekit_recycle.report import holdout_paragraphs

    if "winner" not in report:
        return "no winner yet: nothing was scored on the search tasks"
    winner = report["winner"]
    lines = [f"{report['evaluations']} evaluations; winner {winner['from']} uses {winner['weights_above_1pct']} of "
             f"{len(winner['weights'])} checkpoints above 1%"]
    return "\n".join(lines + holdout_paragraphs(report))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print report.json's content instead of the table.")
@click.option("--summary", "as_summary", is_flag=True,
              help="Print a short Markdown summary of the latest session: holdout table, margins, what was "
              "published (e.g. >> \"$GITHUB_STEP_SUMMARY\").")
@click.pass_context
def report_command(ctx: click.Context, run_dir: Path, as_json: bool, as_summary: bool) -> None:
    """Print the report of RUN_DIR, finished or still running (built from its journal)."""
    from mergekit_recycle.report import load_report, summary, table

    if as_json and as_summary:  # mutually exclusive: one line, as every refusal here is
        click.echo("report: --json and --summary cannot be combined: give one (--json prints report.json, "
                   "--summary a Markdown summary)", err=True)
        ctx.exit(2)
    report = load_report(run_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if as_summary:
        from mergekit_recycle.journal import Journal
        from mergekit_recycle.run_folder import JOURNAL

        click.echo(summary(report, Journal(run_dir / JOURNAL, repair=False).records), nl=False)
        return
    click.echo(table(report))
    click.echo(holdout_summary(report))


def main() -> None:
    cli(prog_name="mergekit-recycle")
