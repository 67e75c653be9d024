"""Every error mergekit-recycle raises on purpose.

Each class also subclasses the builtin that fits (as huggingface_hub's errors do), so
callers can catch `ValueError` or `FileNotFoundError` without knowing our names, and
carries what went wrong as attributes rather than only as text.
"""

from pathlib import Path
from typing import ClassVar, Optional, Union


class RecycleError(Exception):
    """Root of the hierarchy: anything raised here on purpose derives from it."""

    # Exit status of the CLI: 2 for input the user can fix, 1 for everything else.
    exit_code: ClassVar[int] = 1

    def __reduce__(self):
        # Pickled as its message and attributes, not by calling __init__ again with `args` (which holds the
        # message only): a Ray worker's error reaches the driver as the same error, with the same attributes.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> "RecycleError":
    # The most derived builtin's constructor: an error that is both a ValueError and an OSError needs OSError's.
    builtin = next(base for base in cls.__mro__ if base.__module__ == "builtins")
    error = (OSError if issubclass(cls, OSError) else builtin).__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigFileError(RecycleError, ValueError):
    """A YAML file that cannot be used as written, with the field at fault.

    Rendered as ``path: location: message``, e.g.
    ``recipes/x.yaml: tasks[0].metric: field required``.
    """

    exit_code = 2

    def __init__(self, path: Union[str, Path], location: str, message: str):
        self.path = Path(path)
        self.location = location
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        # A key or a message can echo what the user wrote (a 2 MB name): cut, never the whole of it.
        where = f"{shorten(self.location, 200)}: " if self.location else ""
        return f"{shorten(self.path, 300)}: {where}{shorten(self.message, 1000)}"


class RecipeError(ConfigFileError):
    """A recycling recipe that is malformed or points at something missing."""


class RecipeFileNotFoundError(RecipeError, FileNotFoundError):
    """The recipe file itself does not exist."""

    def __init__(self, path: Union[str, Path]):
        super().__init__(path, "", "recipe file not found")


class MergeConfigError(ConfigFileError):
    """A mergekit YAML that mergekit (or recycle_linear) cannot merge as written."""


class MergeConfigFileNotFoundError(MergeConfigError, FileNotFoundError):
    """The mergekit YAML itself does not exist."""

    def __init__(self, path: Union[str, Path]):
        super().__init__(path, "", "merge configuration file not found")


class RecycleLinearError(RecycleError, ValueError):
    """recycle_linear was given weights or a scale it cannot use.

    ``parameter`` is the merge parameter at fault (``weight`` or ``scale``), ``model``
    the input it belongs to (None when it is not one model's) and ``tensor`` the
    tensor being merged when the fault was found.
    """

    exit_code = 2

    def __init__(self, reason: str, parameter: str, model: Optional[str] = None, tensor: Optional[str] = None):
        self.reason = reason
        self.parameter = parameter
        self.model = model
        self.tensor = tensor
        text = "recycle_linear: " + (f"model {model}: " if model is not None else "") + reason
        if tensor is not None:
            text += f" (while merging {tensor})"
        super().__init__(text)


class DemoPoolError(RecycleError, OSError):
    """The demo pool cannot be built at ``path``; nothing that was there is touched."""

    exit_code = 2

    def __init__(self, path: Union[str, Path], message: str):
        self.path = Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DemoPoolExistsError(DemoPoolError, FileExistsError):
    """``path`` already holds something other than the demo pool asked for."""


class PoolError(RecycleError, ValueError):
    """A checkpoint of the pool that cannot be used: missing, unreadable, or unlike the others.

    ``location`` is the recipe field (``pool[3]``, ``base``), ``checkpoint`` the folder or
    repo, and ``tensor`` the tensor at fault when there is one.
    """

    exit_code = 2

    def __init__(self, path: Union[str, Path], location: str, checkpoint: str, message: str, tensor: Optional[str] = None):
        self.path = Path(path)
        self.location = location
        self.checkpoint = checkpoint
        self.message = message
        self.tensor = tensor
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.location}: checkpoint {self.checkpoint}: {self.message}"


class RunDirError(RecycleError, ValueError):
    """A run folder that cannot be continued as asked (another recipe's run, a damaged journal)."""

    exit_code = 2

    def __init__(self, run_dir: Union[str, Path], message: str):
        self.run_dir = Path(run_dir)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.run_dir}: {self.message}"


class FinalMergeError(RecycleError, RuntimeError):
    """Merging the winner into RUN_DIR/merged failed; the journal and report keep the search, unfinished.

    ``architecture`` is the pool's, ``tensor`` the tensor mergekit stopped at (None when it named none).
    """

    def __init__(self, run_dir: Union[str, Path], architecture: str, reason: str, tensor: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.architecture = architecture
        self.reason = reason
        self.tensor = tensor
        super().__init__(f"{self.run_dir}: merging the winner into merged/ failed for {architecture}: {reason}; "
                         "the search and its report are kept (not finished): fix the cause and rerun the same "
                         "command to merge again")

    def __str__(self) -> str:
        return self.args[0]


class SearchAbortedError(RecycleError, RuntimeError):
    """Too many candidates failed in a row; the journal keeps everything evaluated so far."""

    def __init__(self, run_dir: Union[str, Path], failures: int, last_error: str):
        self.run_dir = Path(run_dir)
        self.failures = failures
        self.last_error = last_error
        super().__init__(
            f"{self.run_dir}: {failures} candidates failed in a row, the last with: {last_error}; "
            "the journal keeps every result so far: fix the cause and rerun the same command to continue"
        )


class SettingError(RecycleError, ValueError):
    """An environment variable whose value cannot be used."""

    exit_code = 2

    def __init__(self, variable: str, value: str, expected: str):
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"{variable}={shorten(repr(value))}: expected {expected}")


class LimitOnGroupError(RecycleError, ValueError):
    """A `limit` was set on an lm-eval group; subsets are drawn per single task."""

    exit_code = 2

    def __init__(self, task: str):
        self.task = task
        super().__init__(f"{task!r} is an lm-eval group; a limit applies to single tasks only")


class HubAccessError(RecycleError, PermissionError):
    """The Hub token cannot publish to ``repo_id`` (none, invalid, read-only, another namespace).

    Raised before the search starts, so a long search never ends in a push that cannot happen.
    """

    exit_code = 2

    def __init__(self, repo_id: str, message: str):
        self.repo_id = repo_id
        self.message = message
        super().__init__(f"cannot publish to {repo_id}: {message}")


class PublishError(RecycleError, OSError):
    """Pushing a run to the Hub failed after retries; the run folder is intact and publishing can be rerun."""

    def __init__(self, run_dir: Union[str, Path], repo_id: str, message: str):
        self.run_dir = Path(run_dir)
        self.repo_id = repo_id
        self.message = message
        super().__init__(f"{self.run_dir}: pushing to {repo_id} failed: {message}; the run folder is intact: "
                         f"rerun `mergekit-recycle publish {self.run_dir}` to try again")

    def __str__(self) -> str:
        return self.args[0]


class HubStateError(RecycleError, OSError):
    """The search state kept in ``repo_id``'s recycle/ folder cannot be read or saved."""

    def __init__(self, repo_id: str, message: str):
        self.repo_id = repo_id
        self.message = message
        super().__init__(f"{repo_id}: search state: {message}")

    def __str__(self) -> str:
        return self.args[0]


class ConcurrentRunError(RecycleError, RuntimeError):
    """Another run committed to ``repo_id``'s search state since this run read it (at ``expected``).

    This run stops rather than overwrite it; its own run folder keeps everything it evaluated.
    """

    def __init__(self, repo_id: str, expected: str, found: str, title: str):
        self.repo_id = repo_id
        self.expected = expected
        self.found = found
        self.title = title
        super().__init__(f"{repo_id}: another run saved its search state there ({found[:7]} \"{title}\") since this run "
                         f"read it at {expected[:7]}; stopping so as not to overwrite it. Let one run at a time search "
                         "this repo (the workflow's concurrency group does); this run's evaluations stay in its run folder")

    def __str__(self) -> str:
        return self.args[0]


# --- echoed values, and errors of lm-eval task definitions ---------------------------------


def one_line(text: object, limit: int = 0) -> str:
    """`text` (an exception's words, say) on one line, shortened to `limit` characters when one is given."""
    flat = " ".join(str(text).split())
    return shorten(flat, limit) if limit else flat


def shorten(text: str, limit: int = 80) -> str:
    """`text`, or its head and tail around an ellipsis and its length when longer than `limit`:
    an error line echoes what the user wrote, and must stay one readable line for any input."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 20, 2)
    return f"{text[: keep // 2]}…{text[len(text) - keep // 2:]} ({len(text)} characters)"


class TaskDefinitionError(RecycleError, ValueError):
    """lm-eval cannot build task ``task`` (defined in ``yaml_path`` where known): its data, template or loader fails.

    Raised when the tasks are built, before anything is scored; callers that know the recipe
    name the recipe field.
    """

    exit_code = 2

    def __init__(self, task: str, reason: str, yaml_path: Optional[Union[str, Path]] = None):
        self.task = task
        self.reason = reason
        self.yaml_path = Path(yaml_path) if yaml_path is not None else None
        where = f" ({self.yaml_path})" if self.yaml_path is not None else ""
        super().__init__(f"lm-eval task {task!r}{where}: {reason}")


class TaskDataNotCachedError(TaskDefinitionError, ConnectionError):
    """A task whose dataset must be downloaded, while the Hub cannot be reached: not a fault of the
    recipe, so `validate` only notes it; `optimize` cannot score the task and stops."""


# -- non-finite tensors (issue 15, section 4) ----------------------------------------------------

class NonFiniteTensorError(PoolError):
    """A checkpoint tensor holding NaN or inf: every merge that gives the checkpoint a weight would be too.

    ``nan`` and ``inf`` count the values of each kind in ``tensor``.
    """

    def __init__(self, path: Union[str, Path], location: str, checkpoint: str, tensor: str, nan: int, inf: int):
        self.nan = nan
        self.inf = inf
        found = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf")) if count)
        super().__init__(path, location, checkpoint,
                         f"tensor {tensor} holds {found} value{'s' if nan + inf > 1 else ''}; every merge that reads this checkpoint would be "
                         "non-finite: re-export the checkpoint from a healthy copy, or drop it from the pool",
                         tensor=tensor)


class NonFiniteMergeError(RecycleError, ValueError):
    """A candidate whose merged parameters hold NaN or inf (the weights or the scale overflow the dtype):
    a failed candidate, not a score. ``tensor`` is the first such parameter, ``dtype`` the merge's."""

    def __init__(self, tensor: str, dtype: str, scale: float):
        self.tensor = tensor
        self.dtype = dtype
        self.scale = scale
        super().__init__(f"the merged tensor {tensor} holds NaN or inf values in {dtype} (scale {scale:g}): "
                         "the merge overflows; narrow search.scale or merge in a wider merge.dtype")


class RayNotInstalledError(RecycleError, ImportError):
    """--workers or --ray-address asked for Ray, which is not installed."""

    exit_code = 2

    def __init__(self):
        super().__init__("--workers and --ray-address run on Ray, which is not installed: "
                         "pip install 'mergekit-recycle[ray]' (on every node of the cluster)")


class RayWorkerError(RecycleError, RuntimeError):
    """The Ray workers cannot go on: none could be placed, all are lost, or one failed outside a candidate.
    ``node`` names where."""

    def __init__(self, node: str, message: str):
        self.node = node
        self.message = message
        super().__init__(f"Ray worker on {node}: {message}" if node != "the cluster" else f"Ray: {message}")
