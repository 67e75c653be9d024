"""Scoring with lm-eval: which tasks a recipe names, and where lm-eval finds them.

Looking tasks up costs nothing for a recipe's own task_paths (include_defaults=False);
lm-eval's built-in index (several seconds to build) is consulted only for names the
task_paths do not define.
"""

import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mergekit_recycle.errors import (LimitOnGroupError, RecipeError, TaskDataNotCachedError, TaskDefinitionError,
                                     one_line, shorten)
from mergekit_recycle.recipe import Recipe


def task_manager(recipe: Recipe, include_defaults: bool = False):
    """An lm-eval TaskManager over the recipe's task_paths (and lm-eval's own tasks if asked)."""
    from lm_eval.tasks import TaskManager

    include_path = [str(path) for path in recipe.task_paths] or None
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_references(recipe: Recipe) -> List[Tuple[str, str]]:
    """(recipe location, task name) for every search and holdout task."""
    return [
        (f"tasks[{index}].{role}", getattr(task, role))
        for index, task in enumerate(recipe.tasks)
        for role in ("search", "holdout")
    ]


def indexed_tasks(recipe: Recipe):
    """(a TaskManager that knows the recipe's tasks, the task references it does not know): lm-eval's
    own tasks are indexed (slow) only when task_paths leave some undefined."""
    references = task_references(recipe)
    manager = task_manager(recipe)
    missing = [(location, name) for location, name in references if name not in manager.task_index]
    if missing:
        manager = task_manager(recipe, include_defaults=True)
        missing = [(location, name) for location, name in missing if name not in manager.task_index]
    return manager, missing


def check_tasks_exist(recipe: Recipe, source: Optional[Path] = None, uncached_ok: bool = False) -> List[str]:
    """Raise RecipeError for the first task lm-eval does not know, cannot build (its data, template
    or loader fails), or that does not report the recipe's metric; all without a model, so that
    `validate` and the start of `optimize` find it before anything is scored.

    With `uncached_ok` (validate), a task whose dataset is not in the local cache while the Hub cannot
    be reached is not checked further; the notes saying so are returned."""
    source = source or Path("<recipe>")
    manager, missing = indexed_tasks(recipe)
    if missing:
        location, name = missing[0]
        where = ", ".join(str(p) for p in recipe.task_paths) or "no task_paths given"
        raise RecipeError(
            source,
            location,
            f"unknown lm-eval task {name!r}: defined neither in task_paths ({where}) nor by lm-eval",
        )
    quiet_lm_eval()
    built: Dict[object, object] = {}
    notes, uncached = [], set()
    with named_task_errors(recipe, source):
        for location, name in task_references(recipe):
            try:
                built.update(build_tasks([name], manager))
            except TaskDataNotCachedError as exc:
                if not uncached_ok:
                    raise
                uncached.add(name)
                notes.append(f"note: {location}: {exc}; optimize checks it once the data is there")
    from lm_eval.api.task import Task

    for index, task in enumerate(recipe.tasks):
        if task.search in uncached:
            continue
        if task.limit and not isinstance(built.get(task.search), Task):  # a group is keyed by its group object
            raise RecipeError(source, f"tasks[{index}].limit", str(LimitOnGroupError(task.search)))
    check_metrics(recipe, built, source)  # a task not built (uncached) has no metrics to check
    return notes


def needs_lm_eval_tasks(recipe: Recipe) -> bool:
    """Whether some task is not defined by the recipe's task_paths (indexing lm-eval's own is slow)."""
    known = task_manager(recipe).task_index if recipe.task_paths else {}
    return any(name not in known for _, name in task_references(recipe))


def build_tasks(names: Sequence[str], manager) -> Dict[object, object]:
    """lm-eval's task dict for `names`, built one name at a time so that a failure names its task
    (TaskDefinitionError): a missing or empty data file, a template that does not compile, a
    custom loader that raises, a dataset that is not in the local cache while offline."""
    from lm_eval.tasks import get_task_dict

    built: Dict[object, object] = {}
    for name in names:
        if name in built:
            continue
        try:
            built.update(get_task_dict([name], manager))
        except Exception as exc:  # noqa: BLE001 - a task's own loader may raise anything
            entry = manager.task_index.get(name)
            config = (getattr(entry, "cfg", None) or {}) if entry is not None else {}
            kind = TaskDataNotCachedError if _unreachable(exc) else TaskDefinitionError
            raise kind(name, _task_failure(exc, config), getattr(entry, "yaml_path", None)) from exc
    return built


def _unreachable(exc: Exception) -> bool:
    """Whether `exc` says the Hub (or a dataset's server) could not be reached, or may not be (offline)."""
    # requests' and httpx's connection errors are not the builtin ConnectionError: match them by name.
    return isinstance(exc, ConnectionError) or any(
        kind.__name__ in ("ConnectionError", "ConnectError", "ConnectTimeout", "OfflineModeIsEnabled",
                          "LocalEntryNotFoundError") for kind in type(exc).__mro__)


def _task_failure(exc: Exception, config: dict) -> str:
    """Why lm-eval could not build a task, and what to do about it, from what it raised."""
    import jinja2

    text = one_line(exc, 200)
    dataset = config.get("dataset_path")
    if isinstance(exc, StopIteration):
        return "its data has no documents (an empty data file?): fill it, or take the task out of the recipe"
    if _unreachable(exc):
        return (f"its dataset {shorten(repr(dataset))} is not in the local cache and cannot be downloaded ({text}): "
                "download it once where the Hub is reachable (without HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), "
                "or point dataset_path at local files")
    if isinstance(exc, FileNotFoundError):
        return f"its data file is missing ({text}): check the paths in the task's YAML"
    if isinstance(exc, jinja2.TemplateError):
        return (f"a template does not work ({type(exc).__name__}: {text}): fix doc_to_text, doc_to_target "
                "or doc_to_choice in the task's YAML")
    return (f"lm-eval cannot build it: {type(exc).__name__}: {text}; fix the task's YAML or its loader "
            "(custom_dataset, !function)")


@contextmanager
def named_task_errors(recipe: Recipe, source: Path) -> Iterator[None]:
    """Turn a TaskDefinitionError into a RecipeError at the recipe field that names the task."""
    try:
        yield
    except TaskDefinitionError as exc:
        location = next(location for location, name in task_references(recipe) if name == exc.task)
        raise RecipeError(source, location, str(exc)) from None


def metric_problem(metric: str, lm_eval_task) -> Optional[str]:
    """Why `metric` (as a recipe names it) cannot be maximised on a built lm-eval task, or None.

    A group's metrics are known only once it is scored: None.
    """
    if not hasattr(lm_eval_task, "higher_is_better"):
        return None
    higher = lm_eval_task.higher_is_better() or {}
    filters = [getattr(f, "name", "none") for f in getattr(lm_eval_task, "_filters", ())] or ["none"]
    reported = [f"{name},{f}" for name in higher for f in filters]
    key = metric if "," in metric else f"{metric},none"
    if key not in reported:
        return f"reports no metric {metric!r} (it reports: {', '.join(metric_name(k) for k in reported) or 'none'})"
    if higher.get(key.split(",")[0]) is False:
        return (f"reports {metric!r} as better when lower; the objective is maximised, so every metric must "
                "be one where higher is better")
    return None


def check_metrics(recipe: Recipe, built: Dict[object, object], source: Path) -> None:
    """Raise RecipeError at `tasks[i].metric` when a search or holdout task cannot report the metric
    (`built`: lm-eval task name -> built task, as `build_tasks` gives)."""
    for index, task in enumerate(recipe.tasks):
        for role in ("search", "holdout"):
            name = getattr(task, role)
            problem = metric_problem(task.metric, built.get(name))
            if problem is not None:
                raise RecipeError(source, f"tasks[{index}].metric", f"lm-eval task {name!r} (tasks[{index}].{role}) "
                                  f"{problem}")


def quiet_lm_eval() -> None:
    """Silence lm-eval's logging and progress bars (and those of `datasets`) for the rest of
    the process: our callers report progress themselves, and a scoring loop would otherwise
    print thousands of lines."""
    import logging

    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    import tqdm

    class _SilentTqdm(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for module in (lm_eval.models.huggingface, lm_eval.api.model, lm_eval.api.task):
        module.tqdm = _SilentTqdm


def metric_name(key: str) -> str:
    """A metric as recipes name it: lm-eval's `acc,none` is `acc`; `exact_match,strict-match` stays."""
    return key[: -len(",none")] if key.endswith(",none") else key


def seeded_subsets(task_dict, limits: Dict[str, int], seed: int, holdback: float = 0.0,
                   part: str = "search") -> Dict[str, List[int]]:
    """Which documents of each task a scorer sees: a dict task -> sorted document indices
    (a task left out is scored on every document).

    With `holdback`, each leaf task's documents are cut in two by a seeded permutation: the
    held-back share (`part="selection"`) that the search never sees, and the rest
    (`part="search"`). A task with a limit is then scored on a seeded subset of that many of
    its search documents. Subsets depend only on the seed, the task and its size, so every
    candidate of a run, and every resumed process, is scored on the same documents; with no
    holdback they are the subsets of earlier versions.
    """
    import numpy as np

    subsets: Dict[str, List[int]] = {}
    if holdback > 0:
        for name, task in leaf_tasks(task_dict).items():
            count = len(list(task.eval_docs))
            order = np.random.default_rng([seed, zlib.crc32(name.encode()), 1]).permutation(count)
            held = max(1, round(holdback * count)) if count > 1 else 0
            chosen = order[:held] if part == "selection" else order[held:]
            subsets[name] = sorted(int(i) for i in chosen)
    if part == "selection":
        return subsets
    for task, limit in limits.items():
        if task not in task_dict:
            raise LimitOnGroupError(task)
        documents = subsets.get(task) or list(range(len(list(task_dict[task].eval_docs))))
        if limit < len(documents):
            rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
            subsets[task] = sorted(documents[int(i)] for i in rng.choice(len(documents), size=limit, replace=False))
    return subsets


def leaf_tasks(task_dict) -> Dict[str, object]:
    """name -> Task for every task in a (possibly nested, for groups) lm-eval task dict."""
    from lm_eval.api.task import Task

    leaves = {}
    for name, value in task_dict.items():
        if isinstance(value, Task):
            leaves[str(name)] = value
        elif isinstance(value, dict):
            leaves.update(leaf_tasks(value))
    return leaves


class TaskScores(dict):
    """task name -> {metric: value}; with log_samples, also each task's per-document metric
    values in `.samples` (task -> metric, named as `metric_name` says -> values in document order)."""

    samples: Dict[str, Dict[str, List[float]]]


def reuse_requests(task_dict, lm, samples: Dict[str, List[int]]) -> None:
    """Build each task's requests once; lm-eval's `evaluate` would rebuild them (prompts,
    choices, templates) for every candidate, though they never change."""
    from lm_eval.api.task import Task

    for name, task in task_dict.items():
        if not isinstance(task, Task):
            continue  # a group: left to lm-eval
        task.build_all_requests(samples=samples.get(name), rank=lm.rank, world_size=lm.world_size)
        instances = task.instances

        def reset(*args, _instances=instances, **kwargs) -> None:
            for instance in _instances:
                instance.resps = []
                instance.filtered_resps = {}

        task.build_all_requests = reset


class PreparedLoglikelihoods:
    """Log-likelihood requests of a causal LM, batched once, scored per candidate in a few tensor ops.

    The requests never change between candidates, only the weights do. So the inputs are
    built once as lm-eval's HFLM builds them (context + continuation, truncated on the left
    to the model's length, last token dropped, padded on the right with no attention mask),
    identical inputs are run once (as HFLM does for one-token multiple-choice continuations),
    and the log-probabilities and greedy checks of all continuation tokens are gathered at
    once instead of in a loop per request. The model computes logits only at the positions
    that hold a continuation token, where it can (`logits_to_keep`): a full batch × length ×
    vocabulary tensor would not fit on a GPU for a large vocabulary.
    """

    def __init__(self, encoded, max_length: int, batch_size: int, device):
        inputs: Dict[tuple, int] = {}
        owners, positions, targets = [], [], []
        for index, (_, context, continuation) in enumerate(encoded):
            tokens = (context + continuation)[-(max_length + 1):][:-1]
            row = inputs.setdefault(tuple(tokens), len(inputs))
            start = len(tokens) - len(continuation)
            owners += [index] * len(continuation)
            positions += [(row, start + offset) for offset in range(len(continuation))]
            targets += continuation
        self.count = len(encoded)
        order = sorted(inputs, key=len, reverse=True)  # similar lengths share a batch: less padding
        where = {}
        batches = []
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            batch = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
            for slot, tokens in enumerate(chunk):
                batch[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                where[inputs[tokens]] = (len(batches), slot)
            batches.append(batch)
        self.device = device
        self.owner = torch.tensor(owners, dtype=torch.long, device=device)
        # Per batch: its inputs, the positions to keep, and for each continuation token in it the
        # row, the kept column, the target token and its place among all continuation tokens.
        self.batches = []
        located = [(where[row], position, target) for (row, position), target in zip(positions, targets)]
        for number, batch in enumerate(batches):
            mine = [(slot, position, target, index)
                    for index, ((b, slot), position, target) in enumerate(located) if b == number]
            keep = sorted({position for _, position, _, _ in mine})
            column = {position: i for i, position in enumerate(keep)}
            columns = [keep, [s for s, _, _, _ in mine], [column[p] for _, p, _, _ in mine],
                       [t for _, _, t, _ in mine], [i for _, _, _, i in mine]]
            self.batches.append((batch.to(device), *(torch.tensor(c, dtype=torch.long, device=device) for c in columns)))
        self.tokens = len(targets)
        self.keep_supported = True

    def _logits(self, model, batch: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Logits at the kept positions, (batch, kept, vocabulary)."""
        if self.keep_supported:
            try:
                return model(batch, logits_to_keep=keep).logits
            except TypeError:  # a model class without logits_to_keep
                self.keep_supported = False
        return model(batch).logits[:, keep]

    @torch.no_grad()
    def score(self, model) -> List[tuple]:
        """(sum of continuation log-probs, whether the continuation is the greedy one) per request."""
        logprob = torch.empty(self.tokens, dtype=torch.float64, device=self.device)
        greedy = torch.empty(self.tokens, dtype=torch.bool, device=self.device)
        for batch, keep, rows, columns, targets, places in self.batches:
            picked = torch.log_softmax(self._logits(model, batch, keep)[rows, columns].float(), dim=-1)
            logprob[places] = picked.gather(1, targets.unsqueeze(1)).squeeze(1).double()
            greedy[places] = picked.argmax(dim=-1) == targets
        totals = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        totals.index_add_(0, self.owner, logprob)
        misses = torch.zeros(self.count, dtype=torch.long, device=self.device)
        misses.index_add_(0, self.owner, (~greedy).long())
        return list(zip(totals.tolist(), (misses == 0).tolist()))


def resident_hflm(**kwargs):
    """An HFLM for a resident model whose weights change between calls, and whose requests do not.

    Each (context, continuation) pair is tokenized once, and a causal model's requests are
    batched once (`PreparedLoglikelihoods`); lm-eval does both again on every call.
    """
    from lm_eval.models.huggingface import HFLM

    class ResidentHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            encoded = [self._encoded(*request.args) for request in requests]
            if self.backend != "causal":
                return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)
            prepared = self.__dict__.setdefault("_prepared", {})
            key = tuple(request.args for request in requests)
            if key not in prepared:
                prepared[key] = PreparedLoglikelihoods(encoded, self.max_length, int(self.batch_size), self.device)
            return prepared[key].score(self.model)

        def _encoded(self, context: str, continuation: str):
            cache = self.__dict__.setdefault("_encodings", {})
            if (context, continuation) not in cache:
                # As lm-eval's TemplateLM.loglikelihood: an empty context conditions on the prefix token.
                if context == "":
                    tokens = self.tok_encode(continuation, add_special_tokens=False)
                    pair = ([self.prefix_token_id], tokens) if self.prefix_token_id != tokens[0] else (tokens[:1], tokens[1:])
                else:
                    pair = self._encode_pair(context, continuation)
                cache[(context, continuation)] = ((context, continuation), *pair)
            return cache[(context, continuation)]

    return ResidentHFLM(**kwargs)


class Scorer:
    """Scores whatever weights sit in one resident model on a fixed set of lm-eval tasks.

    The tasks and their requests are built once, the prompts are tokenized and batched once,
    and the model is wrapped in one HFLM, so that scoring many candidates costs little more than
    their forward passes: copy new weights into `model` in place and call `score()` again.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[str], task_paths: Sequence[Path] = (),
                 include_defaults: bool = False, batch_size: int = 256, device: str = "cpu",
                 limits: Optional[Dict[str, int]] = None, seed: int = 0, holdback: float = 0.0,
                 part: str = "search"):
        from lm_eval.tasks import TaskManager

        quiet_lm_eval()
        manager = TaskManager(include_path=[str(path) for path in task_paths] or None,
                              include_defaults=include_defaults)
        self.tasks = list(tasks)
        self.task_dict = build_tasks(self.tasks, manager)
        self.samples = seeded_subsets(self.task_dict, limits or {}, seed, holdback, part)
        self.model = model
        self.lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        reuse_requests(self.task_dict, self.lm, self.samples)

    def score(self, log_samples: bool = False) -> TaskScores:
        """Every task's metrics for the current weights, named as `metric_name` says."""
        import lm_eval.evaluator

        results = lm_eval.evaluator.evaluate(
            self.lm, self.task_dict, samples=self.samples or None, bootstrap_iters=0, log_samples=log_samples,
            verbosity="ERROR",
        )
        scores = TaskScores()
        for task in self.tasks:
            scores[task] = {
                metric_name(key): value
                for key, value in results["results"][task].items()
                if "," in key and "_stderr" not in key
            }
        scores.samples = {task: per_document(samples) for task, samples in (results.get("samples") or {}).items()}
        return scores


def per_document(samples: List[dict]) -> Dict[str, List[float]]:
    """lm-eval's logged samples of one task -> metric (named as `metric_name` says) -> values in document order."""
    values: Dict[str, List[tuple]] = {}
    for sample in samples:
        for metric in sample.get("metrics", ()):
            value = sample.get(metric)
            if isinstance(value, (int, float)):  # per-document metrics only (not e.g. bleu's tuples)
                key = metric_name(f"{metric},{sample.get('filter', 'none')}")
                values.setdefault(key, []).append((sample["doc_id"], float(value)))
    return {key: [value for _, value in sorted(pairs)] for key, pairs in values.items()}
