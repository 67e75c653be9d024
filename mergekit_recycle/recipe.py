"""The recipe: a frozen description of one recycling job, read from YAML.

A recipe is data. It names the pool of checkpoints, the tasks that score a merge,
and the settings of the search, the merge and the output; a run is a plan applied to
it. Every relative path in a recipe is relative to the folder of the recipe file.
"""

import errno
import re
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Tuple, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mergekit_recycle.config_files import read_yaml, validate_model
from mergekit_recycle.constants import MAX_SEED
from mergekit_recycle.errors import RecipeError, RecipeFileNotFoundError, shorten
from mergekit_recycle.simplex import normalise

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _repo_id(value: str) -> str:
    if not _REPO_ID.match(value) or len(value) > 96:  # the Hub's limit; a longer one is echoed only in part
        raise ValueError(f"{shorten(repr(value))} is not a Hub repo id of the form org/name (at most 96 characters)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)  # the Hub's own rules: length, no '--' or '..', no '-' or '.' at the end
    except HFValidationError as exc:
        raise ValueError(" ".join(f"not a Hub repo id: {exc}".split())) from None
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{shorten(repr(value))} is not a name: use letters, digits, '.', '_' and '-' (at most 96)")
    return value


def _task_name(value: str) -> str:
    """An lm-eval task name as written: a space in it is a typo lm-eval would not forgive either."""
    if not value.strip():
        raise ValueError("an lm-eval task name is needed")
    if any(char.isspace() for char in value):
        raise ValueError(f"{shorten(repr(value))} has spaces in it: lm-eval task names have none (remove them)")
    return value


RepoId = Annotated[str, AfterValidator(_repo_id)]
Name = Annotated[str, AfterValidator(_name)]
NonEmpty = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]
TaskName = Annotated[str, AfterValidator(_task_name)]
# Strict: a recipe that says `budget: true` or `sigma0: "0.3"` is wrong, not coerced.
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0)]
# Documented ranges (README, recipe reference): beyond them a value is a typo, and would fail
# only after evaluations (cma's seed, an overflowing scale, a step size that JSON cannot hold).
MAX_LIMIT = 10**9
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6
MIN_SIGMA0, MAX_SIGMA0 = 1e-6, 10.0
MIN_SCALE, MAX_SCALE = 1e-3, 1e3
MAX_BUDGET = 10**9
MAX_POPULATION = 10**4
# Few-shot examples per prompt: beyond this a value is a typo (no model's context holds that many).
MAX_FEWSHOT = 10**4
# lm-eval metric names, optionally with a filter: `acc`, `exact_match,strict-match`.
MetricName = Annotated[str, StringConstraints(pattern=r"^[^,\s]+(,[^,\s]+)?$")]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _recipe_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("recipe_dir", ".")).resolve()


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """`path` made absolute against the recipe's folder. A path the system cannot follow (a symlink
    loop, a name too long) is a ValueError, so that the error names the recipe field."""
    try:
        full = _recipe_dir(info) / Path(path).expanduser()
        resolved = full.resolve()
        resolved.exists()  # an over-long name fails here, not in resolve()
    except RuntimeError as exc:  # Python < 3.13 reports a symlink loop (and an unknown ~user) so
        loop = "loop" in str(exc)
        raise ValueError(f"{shorten(path)} is a symlink loop: point it at a real folder" if loop
                         else f"cannot use {shorten(path)}: {exc}") from None
    except OSError as exc:
        reason = "is a symlink loop: point it at a real folder" if exc.errno == errno.ELOOP else \
            f"cannot be used: {exc.strerror or exc}"
        raise ValueError(f"{shorten(path)} {reason}") from None
    return resolved


class LocalCheckpoint(Frozen):
    """A checkpoint directory on disk (config.json plus weights)."""

    path: Path
    allow_pickle: StrictBool = False

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path, info: ValidationInfo) -> Path:
        resolved = _resolve(path, info)
        if not resolved.exists():
            raise ValueError(f"no such checkpoint directory: {shorten(resolved, 200)}")
        if not resolved.is_dir():
            raise ValueError(f"not a directory: {shorten(resolved, 200)}")
        if not (resolved / "config.json").is_file():
            empty = "an empty folder" if not any(resolved.iterdir()) else "not a checkpoint directory"
            raise ValueError(f"{empty} (no config.json): {shorten(resolved, 200)}")
        return resolved

    @property
    def label(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"local  {self.path}" + ("  (pickle weights allowed)" if self.allow_pickle else "")


class HubCheckpoints(Frozen):
    """Checkpoints in a Hub repo: one per matching revision and subfolder.

    Revisions are branch or tag names, commit SHAs, or glob patterns over the repo's
    branches and tags; subfolders are folder paths, or glob patterns over the folders
    that hold a config.json. Each match is pinned to its commit SHA when the pool is pulled.
    """

    repo: RepoId
    revisions: Tuple[NonEmpty, ...] = Field(default=("main",), min_length=1)
    subfolders: Optional[Tuple[NonEmpty, ...]] = Field(default=None, min_length=1)
    # Pickle weights (*.bin, *.pt) can run code when loaded: only where the recipe's author says so.
    allow_pickle: StrictBool = False

    @field_validator("subfolders")
    @classmethod
    def _folder_paths(cls, values: Optional[Tuple[str, ...]]) -> Optional[Tuple[str, ...]]:
        """Paths inside the repo, without leading or trailing slashes (`checkpoint-1/` is `checkpoint-1`)."""
        if values is None:
            return None
        paths = tuple("/".join(part for part in value.split("/") if part not in ("", ".")) for value in values)
        for value, path in zip(values, paths):
            if not path:
                raise ValueError(f"{shorten(repr(value))} is the repo root: for a checkpoint at the root, leave out subfolders")
            if ".." in path.split("/"):
                raise ValueError(f"{shorten(repr(value))} is not a folder inside the repo")
        return paths

    @field_validator("revisions", "subfolders")
    @classmethod
    def _unique(cls, values: Optional[Tuple[str, ...]]) -> Optional[Tuple[str, ...]]:
        for value in values or ():
            if values.count(value) > 1:
                raise ValueError(f"{shorten(repr(value))} is listed twice")
        return values

    @property
    def key(self) -> Tuple[str, frozenset, frozenset]:
        """What makes two entries the same checkpoints (repo ids are case-insensitive on the Hub)."""
        return (self.repo.lower(), frozenset(self.revisions), frozenset(self.subfolders or ()))

    @property
    def label(self) -> str:
        return self.repo

    def describe(self) -> str:
        text = f"hub    {self.repo}  revisions={list(self.revisions)}"
        if self.subfolders:
            text += f"  subfolders={list(self.subfolders)}"
        if self.allow_pickle:
            text += "  (pickle weights allowed)"
        return text + "  (resolved and pinned to commit SHAs when the pool is pulled)"


def _entry_kind(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return "local" if "path" in value else "hub" if "repo" in value else None
    if isinstance(value, LocalCheckpoint):
        return "local"
    return "hub" if isinstance(value, HubCheckpoints) else None


PoolEntry = Annotated[
    Union[Annotated[LocalCheckpoint, Tag("local")], Annotated[HubCheckpoints, Tag("hub")]],
    Discriminator(
        _entry_kind,
        custom_error_type="pool_entry",
        custom_error_message="a checkpoint needs either `path:` (a local directory) or `repo:` (a Hub repo)",
    ),
]


class TaskSpec(Frozen):
    """One capability: an lm-eval task scored during the search, and its held-out twin."""

    name: Name
    search: TaskName
    holdout: TaskName
    metric: MetricName
    # 0 reports a task without scoring the objective on it; a positive weight is within
    # [MIN_WEIGHT, MAX_WEIGHT], so that every share of the objective is a number the report can print.
    weight: NonNegativeFloat = 1.0
    limit: Optional[Annotated[StrictInt, Field(gt=0, le=MAX_LIMIT)]] = None
    # As lm-eval's --num_fewshot and --apply_chat_template, for both the search and the holdout task.
    # Fields added after the first recipes: at their defaults they leave a run's fingerprint unchanged
    # (LATER_TASK_FIELDS). None: the number the task's YAML gives (0 where it gives none).
    num_fewshot: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_FEWSHOT)]] = None
    apply_chat_template: StrictBool = False

    @field_validator("weight")
    @classmethod
    def _weight_in_range(cls, weight: float) -> float:
        if weight != 0 and not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(f"{weight!r} is out of range: a weight is 0 (report only) or between "
                             f"{MIN_WEIGHT:g} and {MAX_WEIGHT:g}; weights are relative, so scale them all alike")
        return weight

    @model_validator(mode="after")
    def _holdout_is_held_out(self) -> "TaskSpec":
        if self.search == self.holdout:
            raise ValueError(f"search and holdout are both {shorten(repr(self.search))}; the holdout task must not be "
                             "seen by the search")
        return self

    @property
    def metric_key(self) -> str:
        """The key lm-eval reports the metric under; the `none` filter is implied."""
        return self.metric if "," in self.metric else f"{self.metric},none"

    @property
    def prompt_settings(self) -> Tuple[Optional[int], bool]:
        """What changes the prompts lm-eval builds for this task's documents: (num_fewshot, apply_chat_template)."""
        return self.num_fewshot, self.apply_chat_template

    def fingerprint_data(self) -> Dict[str, Any]:
        """This task as a run's fingerprint records it: the fields added later only where they are
        not at their defaults, so that a run started before they existed resumes."""
        data = self.model_dump(mode="json")
        for field in LATER_TASK_FIELDS:
            if getattr(self, field) == type(self).model_fields[field].default:
                del data[field]
        return data


# TaskSpec fields added after runs were first fingerprinted (see TaskSpec.fingerprint_data).
LATER_TASK_FIELDS = ("num_fewshot", "apply_chat_template")


Scale = Annotated[StrictFloat, Field(ge=MIN_SCALE, le=MAX_SCALE)]
ScaleRange = Tuple[Scale, Scale]


def _scale_shape(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"scale is a number or a [lo, hi] pair, got a list of {len(value)}")
        # Said here: pydantic would report only that the pair is not a number.
        if all(isinstance(v, float) for v in value) and not all(MIN_SCALE <= v <= MAX_SCALE for v in value):
            raise ValueError(f"a scale range must lie within [{MIN_SCALE:g}, {MAX_SCALE:g}], got "
                             f"[{value[0]:g}, {value[1]:g}]")
        return tuple(value)
    return value


class SearchSettings(Frozen):
    """CMA-ES settings. `scale` is a number, or a [lo, hi] range to search (needs a base)."""

    budget: Annotated[StrictInt, Field(gt=0, le=MAX_BUDGET)] = 100
    population: Optional[Annotated[StrictInt, Field(ge=2, le=MAX_POPULATION)]] = None
    # In units of weight (the weights sum to 1): below MIN_SIGMA0 no step changes a merge, above
    # MAX_SIGMA0 every step is a random restart.
    sigma0: Annotated[StrictFloat, Field(ge=MIN_SIGMA0, le=MAX_SIGMA0)] = 0.25
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] = 0
    scale: Annotated[Union[Scale, ScaleRange], BeforeValidator(_scale_shape)] = Field(default=1.0, union_mode="left_to_right")

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: Union[float, ScaleRange]) -> Union[float, ScaleRange]:
        if isinstance(scale, tuple) and not scale[0] < scale[1]:
            raise ValueError(f"a scale range needs lo < hi, got {list(scale)}")
        return scale

    @property
    def scale_is_searched(self) -> bool:
        return isinstance(self.scale, tuple)


class SelectionSettings(Frozen):
    """How the winner is chosen once the search is over (see selection.py).

    `holdback` is the share of each search task's documents that CMA-ES never sees; the best
    `finalists` proposals and the CMA-ES mean are scored on them with every baseline, and a
    finalist replaces the best baseline only when its paired-bootstrap margin on them stays above 0
    at `confidence`, one-sided, corrected for the number of finalists compared. `holdback: 0`
    keeps the plain rule: the best merge on the search tasks wins.
    """

    holdback: Annotated[StrictFloat, Field(ge=0, le=0.9)] = 0.3
    finalists: Annotated[StrictInt, Field(ge=1, le=64)] = 4
    # 0: the lower bound at 1/finalists, which roughly takes back what picking the best of the finalists
    # adds (see selection.py); higher values demand a clearer win before a baseline is replaced.
    confidence: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0

    @property
    def enabled(self) -> bool:
        return self.holdback > 0


class MergeSettings(Frozen):
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    # Code shipped with a checkpoint runs only where the recipe's author says so.
    trust_remote_code: StrictBool = False
    # Architectures outside the tested matrix (architecture.SUPPORTED) are refused unless this is set.
    allow_untested_architecture: StrictBool = False


def default_run_dir(name: str) -> Path:
    """Where a run goes when the recipe sets no output.run_dir: runs/<name> in the recipe's folder
    (relative to it, as every path in a recipe), so that a recipe means the same run from any
    working directory."""
    return Path("runs") / name


class OutputSettings(Frozen):
    run_dir: Optional[Path] = None
    hub_repo: Optional[RepoId] = None
    private: StrictBool = True

    @field_validator("run_dir")
    @classmethod
    def _resolved(cls, run_dir: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        """Resolved here, so that a path the system cannot follow is reported at output.run_dir
        (the default, which needs the recipe's name, is the recipe's to resolve)."""
        return None if run_dir is None else _resolve(run_dir, info)


class Recipe(Frozen):
    """A recycling job. Build it with `load_recipe` (or `parse_recipe` for in-memory data)."""

    name: Name
    pool: Tuple[PoolEntry, ...] = Field(min_length=2)
    base: Optional[PoolEntry] = None
    tasks: Tuple[TaskSpec, ...] = Field(min_length=1)
    task_paths: Tuple[Path, ...] = ()
    search: SearchSettings = SearchSettings()
    selection: SelectionSettings = SelectionSettings()
    merge: MergeSettings = MergeSettings()
    output: OutputSettings = Field(default_factory=OutputSettings, validate_default=True)

    @field_validator("task_paths")
    @classmethod
    def _task_paths_exist(cls, paths: Tuple[Path, ...], info: ValidationInfo) -> Tuple[Path, ...]:
        resolved = []
        for path in paths:
            full = _resolve(path, info)
            if not full.is_dir():
                raise ValueError(f"no such task folder: {full}" if not full.exists() else f"not a folder: {full}")
            resolved.append(full)
        return tuple(resolved)

    @field_validator("output")
    @classmethod
    def _run_dir(cls, output: OutputSettings, info: ValidationInfo) -> OutputSettings:
        if output.run_dir is not None:
            return output
        return output.model_copy(update={"run_dir": _resolve(default_run_dir(info.data.get("name", "recipe")), info)})

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        seen: Dict[Any, int] = {}
        for index, entry in enumerate(self.pool):
            key = entry if isinstance(entry, LocalCheckpoint) else entry.key
            if key in seen:
                raise ValueError(f"pool[{index}] duplicates pool[{seen[key]}] ({entry.label})")
            seen[key] = index
        names = [task.name for task in self.tasks]
        for index, name in enumerate(names):
            if names.index(name) != index:
                raise ValueError(f"tasks[{index}].name: {shorten(repr(name))} is used by tasks[{names.index(name)}] too")
        prompts: Dict[str, int] = {}  # lm-eval task -> the first recipe task that scores it
        for index, task in enumerate(self.tasks):
            for name in (task.search, task.holdout):
                first = prompts.setdefault(name, index)
                other = self.tasks[first]
                if other.prompt_settings != task.prompt_settings:
                    field = "num_fewshot" if other.num_fewshot != task.num_fewshot else "apply_chat_template"
                    raise ValueError(
                        f"tasks[{index}].{field}: lm-eval task {shorten(repr(name))} is scored by tasks[{first}] too, "
                        f"with {field} {_yaml_value(getattr(other, field))}; an lm-eval task is prompted one way "
                        "in a run"
                    )
        searched = [task.search for task in self.tasks]
        for index, task in enumerate(self.tasks):
            if task.holdout in searched:
                raise ValueError(
                    f"tasks[{index}].holdout: {shorten(repr(task.holdout))} is searched by "
                    f"tasks[{searched.index(task.holdout)}]; "
                    "a holdout task must never be seen by the search"
                )
        if not any(task.weight > 0 for task in self.tasks):
            raise ValueError("tasks: every task weight is 0; give at least one task a positive weight")
        scale = self.search.scale
        if self.base is None and (self.search.scale_is_searched or scale != 1.0):
            raise ValueError(f"search.scale: scale {scale!r} needs `base:` (the anchor to extrapolate from)")
        return self

    def shares(self) -> Dict[str, float]:
        """task name -> its share of the objective (the weights, normalised)."""
        return dict(zip([task.name for task in self.tasks], normalise([task.weight for task in self.tasks])))


def _yaml_value(value: Any) -> str:
    """A setting as a recipe writes it (`true`, `3`), or `unset`."""
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def parse_recipe(data: Any, recipe_dir: Path, source: Path = Path("<recipe>")) -> Recipe:
    """Validate recipe data whose relative paths are relative to `recipe_dir`."""
    return validate_model(
        Recipe, data, source, RecipeError, context={"recipe_dir": recipe_dir}
    )


def load_recipe(path: Union[str, Path]) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the field at fault."""
    path = Path(path)
    return parse_recipe(read_yaml(path, RecipeError, RecipeFileNotFoundError), path.parent, source=path)


def describe_recipe(recipe: Recipe, source: Optional[Path] = None) -> str:
    """The resolved plan of a recipe, as `validate` prints it."""
    lines = [f"recipe   {recipe.name}" + (f"  ({source})" if source else "")]
    lines.append(f"pool     {len(recipe.pool)} entries")
    lines += [f"  [{i}] {entry.describe()}" for i, entry in enumerate(recipe.pool)]
    if recipe.base is None:
        lines.append("base     none: the merge is the plain weighted average Σ wᵢ θᵢ, Σw = 1")
    else:
        lines.append(f"base     {recipe.base.describe()}")
        lines.append("         the merge is θ_base + scale · Σ wᵢ (θᵢ − θ_base), Σw = 1")
    shares = recipe.shares()
    lines.append(f"tasks    {len(recipe.tasks)}; objective = weighted mean of the search metrics")
    for task, share in ((task, shares[task.name]) for task in recipe.tasks):
        limit = "all examples" if task.limit is None else f"a seeded subset of {task.limit}"
        prompts = "" if task.num_fewshot is None else f", {task.num_fewshot}-shot"
        prompts += ", chat template" if task.apply_chat_template else ""
        lines.append(
            f"  {task.name}: search={task.search} holdout={task.holdout} metric={task.metric_key} "
            f"weight={task.weight:g} ({share:.0%} of the objective), {limit}{prompts}"
        )
    lines.append("task_paths " + (", ".join(str(p) for p in recipe.task_paths) or "none (lm-eval's own tasks)"))
    search = recipe.search
    population = "cma's default" if search.population is None else str(search.population)
    scale = f"searched in [{search.scale[0]:g}, {search.scale[1]:g}]" if search.scale_is_searched else f"{search.scale:g}"
    lines.append(
        f"search   CMA-ES: budget={search.budget} evaluations, population={population}, "
        f"sigma0={search.sigma0:g}, seed={search.seed}, scale={scale}"
    )
    selection = recipe.selection
    if selection.enabled:
        lines.append(
            f"select   {selection.holdback:.0%} of each search task's documents held back from CMA-ES; the best "
            f"{selection.finalists} proposals and the CMA-ES mean are scored on them with every baseline, and replace "
            f"the best baseline only on a paired-bootstrap win (confidence {selection.confidence:g}, corrected)"
        )
    else:
        lines.append("select   holdback 0: the best merge on the search tasks wins (no held-back check)")
    lines.append(f"merge    recycle_linear, dtype={recipe.merge.dtype}, device={recipe.merge.device}"
                 + (", trust_remote_code=true" if recipe.merge.trust_remote_code else ""))
    output = recipe.output
    hub = output.hub_repo or "none (not published)"
    # The default is relative to the recipe's folder, as every path in a recipe, not to the working directory.
    default = source is not None and output.run_dir == source.parent.resolve() / default_run_dir(recipe.name)
    default = f" (the default: runs/{recipe.name} in the recipe's folder)" if default else ""
    lines.append(f"output   run_dir={output.run_dir}{default}, hub_repo={hub}, private={str(output.private).lower()}")
    return "\n".join(lines)
