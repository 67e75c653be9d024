"""The `mergekit-recycle` command line.

Every error raised on purpose (RecycleError) becomes one line on stderr and an exit
status (2 for input the user can fix); MERGEKIT_RECYCLE_DEBUG=1 shows the traceback.
"""

import json
from pathlib import Path
from typing import Any, NoReturn

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_recycle import __version__, constants
from mergekit_recycle.demo_pool.build import SIZES
from mergekit_recycle.errors import RecycleError


def render_error(exc: BaseException) -> str:
    """One line: our own messages say what went wrong and how to fix it."""
    if isinstance(exc, RecycleError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}; rerun with MERGEKIT_RECYCLE_DEBUG=1 for the traceback"
    return " ".join(text.split())


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


@cli.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@add_merge_options
def merge_command(merge_options: MergeOptions, config_file: Path, out_path: Path) -> None:
    """Merge CONFIG_FILE (any mergekit YAML) into OUT_PATH, with recycle_linear available.

    Takes the same options as mergekit-yaml.
    """
    from mergekit_recycle.merge import merge_yaml

    merge_options.apply_global_options()
    merge_yaml(config_file, out_path, merge_options)


@cli.command("validate")
@click.argument("recipe_file", type=click.Path(dir_okay=False, path_type=Path))
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
    from mergekit_recycle.recipe import describe_recipe, load_recipe

    recipe = load_recipe(recipe_file)
    if check_tasks:
        from mergekit_recycle.evaluate import check_tasks_exist

        check_tasks_exist(recipe, recipe_file)
    if as_json:
        click.echo(json.dumps(recipe.model_dump(mode="json"), indent=2))
    else:
        click.echo(describe_recipe(recipe, recipe_file))


@cli.command("demo-pool")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True, help="Seed of the whole pool.")
@click.option("--size", type=click.Choice(SIZES), default="default", show_default=True,
              help="'small' trains less and asks fewer questions (for tests).")
@click.option("--quiet", is_flag=True, help="Print only the summary table.")
def demo_pool_command(directory: Path, seed: int, size: str, quiet: bool) -> None:
    """Build the demo pool in DIRECTORY: tiny Llama checkpoints that trade three skills off,
    their lm-eval tasks and recipe.yaml. Offline and deterministic; a no-op when DIRECTORY
    already holds the same pool."""
    from mergekit_recycle.demo_pool import build_pool, summary_table

    report = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    summary = build_pool(directory, seed=seed, size=size, report=report)
    click.echo(summary_table(summary))
    click.echo(f"recipe: {directory / 'recipe.yaml'} (the pool took {summary.build_seconds:.0f} s to build)")


def main() -> None:
    cli(prog_name="mergekit-recycle")
