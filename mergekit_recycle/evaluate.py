"""Scoring with lm-eval: which tasks a recipe names, and where lm-eval finds them.

Looking tasks up costs nothing for a recipe's own task_paths (include_defaults=False);
lm-eval's built-in index (several seconds to build) is consulted only for names the
task_paths do not define.
"""

import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_recycle.errors import LimitOnGroupError, RecipeError
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


def missing_tasks(recipe: Recipe) -> List[Tuple[str, str]]:
    """The task references that neither task_paths nor lm-eval's own tasks define."""
    references = task_references(recipe)
    known = task_manager(recipe).task_index if recipe.task_paths else {}
    missing = [(location, name) for location, name in references if name not in known]
    if missing:
        known = task_manager(recipe, include_defaults=True).task_index
        missing = [(location, name) for location, name in missing if name not in known]
    return missing


def check_tasks_exist(recipe: Recipe, source: Optional[Path] = None) -> None:
    """Raise RecipeError for the first task lm-eval does not know."""
    missing = missing_tasks(recipe)
    if missing:
        location, name = missing[0]
        where = ", ".join(str(p) for p in recipe.task_paths) or "no task_paths given"
        raise RecipeError(
            source or Path("<recipe>"),
            location,
            f"unknown lm-eval task {name!r}: defined neither in task_paths ({where}) nor by lm-eval",
        )


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
        from lm_eval.tasks import TaskManager, get_task_dict

        quiet_lm_eval()
        manager = TaskManager(include_path=[str(path) for path in task_paths] or None,
                              include_defaults=include_defaults)
        self.tasks = list(tasks)
        self.task_dict = get_task_dict(self.tasks, manager)
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
