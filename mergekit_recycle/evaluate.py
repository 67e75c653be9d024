"""Scoring with lm-eval: which tasks a recipe names, and where lm-eval finds them.

Looking tasks up costs nothing for a recipe's own task_paths (include_defaults=False);
lm-eval's built-in index (several seconds to build) is consulted only for names the
task_paths do not define.
"""

import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mergekit_recycle import constants, metrics
from mergekit_recycle.errors import (LimitOnGroupError, RecipeError, TaskDataNotCachedError, TaskDefinitionError,
                                     one_line, shorten)
from mergekit_recycle.loglikelihoods import PreparedLoglikelihoods, sliding_window
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
    check_prompts(recipe, built, source)
    if any(task.apply_chat_template for task in recipe.tasks):
        folder = local_tokenizer_folder(recipe)
        if folder is not None:  # a Hub pool's tokenizer is checked once the pool is pulled
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.merge.trust_remote_code)
            except (OSError, ValueError):
                tokenizer = None  # loading the pool says what is wrong with it
            if tokenizer is not None:
                check_chat_templates(recipe, tokenizer, source)
    return notes


def check_prompts(recipe: Recipe, built: Dict[object, object], source: Path) -> None:
    """Raise RecipeError at `tasks[i].num_fewshot` for a number of few-shot examples a search or holdout
    task cannot give, and at `tasks[i].search` (or holdout) for a generate_until task that samples
    (`built`: as `check_metrics` takes it; a task not built is not checked)."""
    named = {_recipe_name(key): value for key, value in built.items()}
    for index, task in enumerate(recipe.tasks):
        for role in ("search", "holdout"):
            name = getattr(task, role)
            for _, leaf in recipe_leaves({name: named[name]} if name in named else {}):
                problem = fewshot_problem(leaf, task.num_fewshot) if task.num_fewshot is not None else None
                if problem is not None:
                    raise RecipeError(source, f"tasks[{index}].num_fewshot", f"lm-eval task {name!r} {problem}")
                problem = generation_problem(leaf)
                if problem is not None:
                    raise RecipeError(source, f"tasks[{index}].{role}", f"lm-eval task {name!r} {problem}")


def local_tokenizer_folder(recipe: Recipe) -> Optional[Path]:
    """The folder the search will take its tokenizer from (resident_merge.load_resident_model's rule: the
    first checkpoint of the pool, then the anchor, with tokenizer files), where it is known without
    pulling the pool: None if a Hub entry comes first."""
    from mergekit_recycle.merge import has_tokenizer
    from mergekit_recycle.recipe import LocalCheckpoint

    for entry in [*recipe.pool, *([recipe.base] if recipe.base is not None else [])]:
        if not isinstance(entry, LocalCheckpoint):
            return None
        if has_tokenizer(entry.path):
            return entry.path
    return None


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

    def __init__(self, scores=(), samples: Optional[Dict[str, Dict[str, List[float]]]] = None):
        super().__init__(scores)
        self.samples = samples if samples is not None else {}


# lm-eval's few-shot seed unless told otherwise (simple_evaluate's fewshot_random_seed, the fourth
# value of the CLI's --seed): the same examples as `lm_eval --num_fewshot n` for the same documents.
FEWSHOT_SEED = 1234


class FewshotError(ValueError):
    """A recipe's num_fewshot that lm-eval task `task` cannot honour (callers name tasks[i].num_fewshot)."""

    def __init__(self, task: str, reason: str):
        self.task = task
        self.reason = reason
        super().__init__(f"lm-eval task {task!r} {reason}")


def _recipe_name(key) -> str:
    """The name a recipe gives an entry of lm-eval's task dict (a group is keyed by its group object)."""
    return key if isinstance(key, str) else str(getattr(key, "group_name", key))


def recipe_leaves(task_dict) -> Iterator[Tuple[str, object]]:
    """(the name the recipe gives it, task) for every task in a task dict: a group's tasks under the group's name."""
    for key, value in task_dict.items():
        for task in leaf_tasks({_recipe_name(key): value}).values():
            yield _recipe_name(key), task


def set_num_fewshot(task_dict, shots: Dict[str, Optional[int]]) -> None:
    """Give each task the recipe's num_fewshot (`shots`: recipe task name -> it; None: the task's own,
    0 where its YAML sets none), as lm-eval's simple_evaluate does with --num_fewshot, before any
    request is built; raise FewshotError for a number the task cannot honour."""
    for name, task in recipe_leaves(task_dict):
        wanted = shots.get(name)
        if wanted is not None:
            problem = fewshot_problem(task, wanted)
            if problem is not None:
                raise FewshotError(name, problem)
            task.set_config(key="num_fewshot", value=wanted)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)


def fewshot_problem(task, shots: int) -> Optional[str]:
    """Why lm-eval `task` cannot be prompted with `shots` few-shot examples, or None."""
    if shots == 0:
        return None
    if task.get_config("num_fewshot") == 0:
        # simple_evaluate ignores --num_fewshot for such a task; a recipe asking for it is told so.
        return "sets num_fewshot: 0 in its YAML, and lm-eval keeps it at 0 whatever --num_fewshot says"
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        return "is a perplexity task (loglikelihood_rolling): it takes no few-shot examples"
    sampler = getattr(task, "sampler", None)
    available = len(sampler.fewshot_docs()) if sampler is not None else 0
    config = getattr(task, "fewshot_cfg", None)
    # As lm-eval's fewshot_context: examples drawn from the task's own test documents leave the one asked out.
    itself = config is not None and config.split == task.get_config("test_split")
    if shots + itself > available:
        where = "it has no documents to draw examples from" if not available else \
            f"it draws them from {available} documents" + (", one of which is the document asked" if itself else "")
        return f"cannot give {shots} few-shot examples: {where}; lower num_fewshot"
    return None


def generation_problem(task, max_length: Optional[int] = None) -> Optional[str]:
    """Why a generate_until task cannot score a search, or None: it must decode greedily (a sampled
    generation makes the objective noise), and leave room for a prompt in the model's length."""
    if task.OUTPUT_TYPE != "generate_until":
        return None
    from lm_eval.models.utils import normalize_gen_kwargs

    settings = normalize_gen_kwargs(dict(task.get_config("generation_kwargs") or {}))
    if settings.get("do_sample"):
        return ("samples its generations (do_sample, or a temperature above 0): every candidate would be scored on "
                "chance; set do_sample: false in its generation_kwargs (greedy decoding)")
    if max_length is not None and settings["max_gen_toks"] >= max_length:
        return (f"generates up to {settings['max_gen_toks']} tokens (max_gen_toks; lm-eval's default is 256), which "
                f"leaves no room for a prompt in the model's {max_length}: set a smaller max_gen_toks in its "
                "generation_kwargs")
    return None


def chat_template_problem(tokenizer) -> Optional[str]:
    """Why the pool's tokenizer cannot apply a chat template, or None."""
    if getattr(tokenizer, "chat_template", None):
        return None
    where = getattr(tokenizer, "name_or_path", "") or "the pool's tokenizer"
    return (f"the pool's tokenizer ({shorten(where, 200)}) has no chat template: add one (chat_template in its "
            "tokenizer_config.json, or a chat_template.jinja), or leave apply_chat_template out")


def check_chat_templates(recipe: Recipe, tokenizer, source: Path) -> None:
    """Raise RecipeError at the first tasks[i].apply_chat_template that `tokenizer` cannot honour."""
    problem = chat_template_problem(tokenizer)
    for index, task in enumerate(recipe.tasks):
        if task.apply_chat_template and problem is not None:
            raise RecipeError(source, f"tasks[{index}].apply_chat_template", problem)


def reuse_requests(task_dict, lm, samples: Dict[str, List[int]], chat: Sequence[str] = ()) -> None:
    """Build each task's requests once; lm-eval's `evaluate` would rebuild them (prompts,
    choices, templates) for every candidate, though they never change.

    Few-shot examples are drawn as lm-eval draws them (the sampler seeded with FEWSHOT_SEED just
    before the requests are built), and a task named in `chat` (a group: each of its tasks) is
    prompted through the model's chat template, its few-shot examples as turns of the conversation:
    lm-eval's --apply_chat_template, which implies --fewshot_as_multiturn."""
    from lm_eval.api.task import Task

    for name, task in task_dict.items():
        settings = {}
        if _recipe_name(name) in chat:
            settings = dict(apply_chat_template=True, fewshot_as_multiturn=True, chat_template=lm.apply_chat_template,
                            tokenizer_name=getattr(lm, "tokenizer_name", ""))
        if not isinstance(task, Task):
            # A group: lm-eval builds its tasks' requests for every candidate; each time as the first time.
            for leaf in leaf_tasks(task).values():
                def rebuild(*args, _leaf=leaf, _build=leaf.build_all_requests, _settings=settings, **kwargs) -> None:
                    _leaf.set_fewshot_seed(seed=FEWSHOT_SEED)
                    _build(*args, **{**kwargs, **_settings})

                leaf.build_all_requests = rebuild
            continue
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        task.build_all_requests(samples=samples.get(name), rank=lm.rank, world_size=lm.world_size, **settings)
        instances = task.instances

        def reset(*args, _instances=instances, **kwargs) -> None:
            for instance in _instances:
                instance.resps = []
                instance.filtered_resps = {}

        task.build_all_requests = reset


def resident_hflm(**kwargs):
    """An HFLM for a resident model whose weights change between calls, and whose requests do not.

    Each (context, continuation) pair is tokenized once, and a causal model's requests are
    batched once (`PreparedLoglikelihoods`); lm-eval does both again on every call.
    """
    from lm_eval.models.huggingface import HFLM

    class ResidentHFLM(HFLM):
        shared_prefix = True  # pack requests that share a context (Scorer: MERGEKIT_RECYCLE_SHARED_PREFIX)
        # Rows per generate() call; None: the batch size. --batch-size auto measures log-likelihood rows,
        # not generation's cache of prompt + max_gen_toks per row, so generation keeps to a smaller batch.
        generation_batch_size: Optional[int] = None

        def generation_rows(self) -> int:
            return self.generation_batch_size or int(self.batch_size)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            if self.backend != "causal":
                encoded = [self._encoded(*request.args) for request in requests]
                return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)
            return self.prepared(requests).score(self.model)

        def prepared(self, requests) -> PreparedLoglikelihoods:
            """A causal model's `requests`, batched once (and again after set_batch_size)."""
            prepared = self.__dict__.setdefault("_prepared", {})
            key = tuple(request.args for request in requests)
            if key not in prepared:
                prepared[key] = PreparedLoglikelihoods([self._encoded(*request.args) for request in requests],
                                                       self.max_length, int(self.batch_size), self.device,
                                                       shared_prefix=self.shared_prefix,
                                                       window=sliding_window(self.model.config))
            return prepared[key]

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

        def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
            """lm-eval's HFLM.generate_until, with everything but the generation done once per set of
            requests: the ordering and batching (the same batches as HFLM's, so the same outputs), the
            tokenized, padded prompts, the stop sequences. Each call then runs the model's `generate` on
            its current weights, with a fresh KV cache and the request's own settings (greedy unless the
            task samples), and nothing of one call is kept for the next but the inputs."""
            prepared = self.__dict__.setdefault("_generations", {})
            # The batches depend on the batch size, which may be set after the first call (--batch-size auto).
            key = (self.generation_rows(), tuple((request.args[0], repr(request.args[1])) for request in requests))
            if key not in prepared:
                prepared[key] = self._prepare_generations([request.args for request in requests])
            collator, batches = prepared[key]
            outputs: List[str] = []
            for contexts, gen_kwargs, inputs, attention, until, max_length, settings in batches:
                generated = self._model_generate(context=inputs, attention_mask=attention, stop=list(until),
                                                 max_length=max_length, **settings).tolist()
                for tokens, context in zip(generated, contexts):
                    if self.backend == "causal":
                        tokens = tokens[inputs.shape[1]:]  # the prompt and its left padding
                    outputs.append(self._generated_text(tokens, until))
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), outputs[-1])
            return collator.get_original(outputs)

        def _prepare_generations(self, arguments):
            """(lm-eval's Collator, which restores the requests' order, and per batch: its contexts and
            generation settings, prompt tokens and attention mask on the device, stop sequences, the
            length to generate to, and the settings left for `generate`), as HFLM.generate_until makes them."""
            from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

            tokens = {context: self.tok_encode(context) for context in {context for context, _ in arguments}}
            collator = Collator(arguments, sort_fn=lambda request: (-len(tokens[request[0]]), request[0]),
                                group_by="gen_kwargs", group_fn=lambda request: request[1])
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            batches = []
            for chunk in collator.get_batched(n=self.generation_rows()):
                contexts, all_gen_kwargs = zip(*chunk)
                settings = normalize_gen_kwargs(all_gen_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(settings.pop("until", None), eos=eos)
                max_gen_toks = settings.pop("max_gen_toks")
                limit = self.max_length
                if self.backend == "causal":
                    limit = self.max_length - max_gen_toks
                    if limit <= 0:
                        raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's "
                                         f"length ({self.max_length})")
                inputs, attention = self.tok_batch_encode(list(contexts), left_truncate_len=limit,
                                                          truncation=self.truncation)
                max_length = settings.pop("max_length", inputs.shape[1] + max_gen_toks)
                batches.append((contexts, all_gen_kwargs[0], inputs.to(self.device), attention.to(self.device),
                                tuple(until), max_length, settings))
            return collator, batches

        def _generated_text(self, tokens: List[int], until) -> str:
            """A generation's text as HFLM.generate_until returns it: past a thinking section, before a stop sequence."""
            from lm_eval.models.utils import postprocess_generated_text

            if isinstance(self.think_end_token, int):
                ends = [index for index, token in enumerate(tokens) if token == self.think_end_token]
                tokens = tokens[ends[-1] + 1:] if ends else tokens
            text = self.tok_decode(tokens)
            if isinstance(self.think_end_token, int):
                text = text.lstrip()
            return postprocess_generated_text(generation=text, stop=list(until),
                                              think_end_token=self.think_end_token
                                              if isinstance(self.think_end_token, str) else None)

    return ResidentHFLM(**kwargs)


# Candidates of a run (per process) whose vectorised metrics are checked against lm-eval's.
CHECKED_CANDIDATES = 3


class Scorer:
    """Scores whatever weights sit in one resident model on a fixed set of lm-eval tasks.

    The tasks and their requests are built once, the prompts are tokenized and batched once,
    and the model is wrapped in one HFLM, so that scoring many candidates costs little more than
    their forward passes: copy new weights into `model` in place and call `score()` again.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[str], task_paths: Sequence[Path] = (),
                 include_defaults: bool = False, batch_size: int = 256, device: str = "cpu",
                 limits: Optional[Dict[str, int]] = None, seed: int = 0, holdback: float = 0.0,
                 part: str = "search", prompts: Optional[Dict[str, Tuple[Optional[int], bool]]] = None):
        """`prompts`: task name -> (num_fewshot, apply_chat_template), as a recipe's TaskSpec.prompt_settings;
        a task left out is prompted as its YAML says, without a chat template."""
        from lm_eval.tasks import TaskManager

        quiet_lm_eval()
        manager = TaskManager(include_path=[str(path) for path in task_paths] or None,
                              include_defaults=include_defaults)
        self.tasks = list(tasks)
        self.task_dict = build_tasks(self.tasks, manager)
        prompts = prompts or {}
        set_num_fewshot(self.task_dict, {name: shots for name, (shots, _) in prompts.items()})
        self.samples = seeded_subsets(self.task_dict, limits or {}, seed, holdback, part)
        self.model = model
        self.lm = resident_hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        self.lm.shared_prefix = constants.shared_prefix()
        chat = [name for name, (_, chat) in prompts.items() if chat]
        for name, task in recipe_leaves(self.task_dict):
            problem = generation_problem(task, self.lm.max_length) or (
                chat_template_problem(self.lm.tokenizer) if name in chat else None)
            if problem is not None:
                raise TaskDefinitionError(name, problem)
        reuse_requests(self.task_dict, self.lm, self.samples, chat=chat)
        # Multiple-choice tasks scored without lm-eval's per-document Python (metrics.py), checked
        # against it on the first candidates.
        self.vectorised = {name: metrics.task_table(name, task) for name, task in self.task_dict.items()
                           if constants.vector_metrics() and isinstance(name, str) and metrics.vectorisable(task) is None}
        self.checks_left = CHECKED_CANDIDATES
        self._vectorised_requests: Optional[PreparedLoglikelihoods] = None
        self.notes: List[str] = []
        self._said: set = set()

    def score(self, log_samples: bool = False) -> TaskScores:
        """Every task's metrics for the current weights, named as `metric_name` says."""
        import lm_eval.evaluator

        scores = TaskScores()
        if self.vectorised:
            self._score_vectorised(scores)
        rest = {name: task for name, task in self.task_dict.items() if name not in self.vectorised}
        if rest:
            samples = {name: indices for name, indices in self.samples.items() if name not in self.vectorised}
            results = lm_eval.evaluator.evaluate(
                self.lm, rest, samples=samples or None, bootstrap_iters=0, log_samples=log_samples, verbosity="ERROR",
            )
            for task in self.tasks:
                if task in self.vectorised:
                    continue
                scores[task] = {metric_name(key): value for key, value in results["results"][task].items()
                                if "," in key and "_stderr" not in key}
            scores.samples.update((task, per_document(samples)) for task, samples in (results.get("samples") or {}).items())
        if not log_samples:
            scores.samples = {}
        return TaskScores({task: scores[task] for task in self.tasks}, samples=scores.samples)

    def _score_vectorised(self, scores: TaskScores) -> None:
        """Score the vectorised tasks from one call for all their log-likelihoods; on the first
        candidates, check every document against lm-eval's process_results, and hand the tasks back
        to lm-eval for the rest of the run at the first difference."""
        if self._vectorised_requests is None:  # built once: a key of every request's text costs a candidate's time
            self._vectorised_requests = self.lm.prepared([i for table in self.vectorised.values() for i in table.instances])
        results = self._vectorised_requests.score(self.model)
        loglikelihoods = np.array([ll for ll, _ in results], dtype=np.float64)
        start = 0
        problem = None
        for name, table in self.vectorised.items():
            mine = slice(start, start + len(table.instances))
            start = mine.stop
            values = metrics.table_scores(table, loglikelihoods[mine])
            if self.checks_left > 0 and problem is None:
                problem = metrics.check(self.task_dict[name], table, results[mine], values)
            aggregation = self.task_dict[name].aggregation()
            scores[name] = {metric: aggregation[metric](per_doc.tolist()) for metric, per_doc in values.items()}
            scores.samples[name] = {metric: per_doc.tolist() for metric, per_doc in values.items()}
        self.checks_left -= 1
        if problem is not None:
            self.notes.append(f"vectorised metrics differ from lm-eval's ({problem}): lm-eval computes them for "
                              "the rest of the run")
            self.vectorised = {}
            prepared = self.lm.__dict__.get("_prepared", {})
            for key in [key for key, value in prepared.items() if value is self._vectorised_requests]:
                del prepared[key]  # lm-eval's evaluate asks for the requests in its own order
            self._vectorised_requests = None
            for name in list(scores):
                del scores[name]
            scores.samples.clear()

    def loglikelihood_requests(self) -> list:
        """Every log-likelihood request built once, encoded as the model scores them (a group's are built
        by lm-eval for every candidate: not among them)."""
        return [self.lm._encoded(*instance.args) for task in leaf_tasks(self.task_dict).values()
                for instance in getattr(task, "_instances", None) or () if instance.request_type == "loglikelihood"]

    def forward_stats(self) -> Dict[str, int]:
        """What a candidate feeds the model for the log-likelihood requests: requests, rows, batches,
        tokens (real, and with the padding), and whether shared prefixes are packed."""
        stats = [prepared.statistics() for prepared in self.lm.__dict__.get("_prepared", {}).values()]
        totals = {key: sum(s[key] for s in stats) for key in ("requests", "rows", "batches", "tokens", "padded")}
        return {**totals, "shared_prefix": all(s["shared_prefix"] for s in stats)}

    def set_batch_size(self, batch_size: int, measured: bool = False) -> None:
        """Rows per forward pass from now on (requests already batched are batched again); a `measured`
        one (--batch-size auto) is not used for generation beyond UNMEASURED_BATCH_SIZE rows."""
        self.lm.batch_size_per_gpu = batch_size
        self.lm.generation_batch_size = min(batch_size, constants.UNMEASURED_BATCH_SIZE) if measured else None
        for cache in ("_prepared", "_generations"):
            self.lm.__dict__.pop(cache, None)
        self._vectorised_requests = None

    def new_notes(self) -> List[str]:
        """What changed how this scorer works (a fallback), not returned before."""
        prepared = self.lm.__dict__.get("_prepared", {}).values()
        notes = self.notes + [p.note for p in prepared if p.note is not None]
        fresh = [note for note in dict.fromkeys(notes) if note not in self._said]
        self._said.update(fresh)
        return fresh


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
