"""Multiple-choice metrics computed for all documents at once, instead of lm-eval's per-document Python.

A multiple-choice task's `acc` is whether the choice of largest log-likelihood is the gold one,
and `acc_norm` the same with log-likelihoods divided by the choices' lengths in characters. Per
candidate only the log-likelihoods change: the documents, their choices and their gold answers
are read once, and the argmax of every document is one array operation.

Only tasks whose result lm-eval would compute exactly this way are taken (`vectorisable`); the
others, and groups, are scored by lm-eval. Whatever is taken is checked against lm-eval's own
`process_results` on the first candidates of a run (`check`).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

METRICS = ("acc", "acc_norm")


def vectorisable(task) -> Optional[str]:
    """None when `task` (a built lm-eval Task) can be scored here, else why not."""
    from lm_eval.api.task import ConfigurableTask

    if not isinstance(task, ConfigurableTask):
        return "not a configurable lm-eval task"
    if task.OUTPUT_TYPE != "multiple_choice":
        return f"output type {task.OUTPUT_TYPE}"
    if task.multiple_input:
        return "several contexts per document"
    if getattr(task.config, "process_results", None) is not None \
            or type(task).process_results is not ConfigurableTask.process_results:
        return "its own process_results"
    metrics = list(task._metric_fn_list)
    if not metrics or any(metric not in METRICS for metric in metrics):
        return f"metrics {', '.join(metrics)}"
    from lm_eval.api.metrics import mean

    if any(task.aggregation().get(metric) is not mean for metric in metrics):
        return "an aggregation other than the mean"
    filters = getattr(task, "_filters", ())
    if len(filters) != 1 or filters[0].name != "none":
        return "filters"
    return None


@dataclass
class TaskTable:
    """One task's documents as arrays: where each request's log-likelihood goes, and the gold answers."""

    name: str
    metrics: Tuple[str, ...]
    doc_ids: List[int]  # in document order
    instances: List[object]  # the task's requests, in the order they are scored
    counts: List[int]  # per document: how many of them are its
    cell: np.ndarray  # per request: its flat place in the (documents, choices) table
    shape: Tuple[int, int]
    lengths: np.ndarray  # (documents, choices): each choice's length in characters; 1 where there is none
    gold: np.ndarray  # (documents, choices): True at each gold choice


def task_table(name: str, task) -> TaskTable:
    """Read a vectorisable task's built requests (`task.instances`) into a TaskTable."""
    by_doc: Dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    doc_ids = sorted(by_doc)
    width = max(len(by_doc[doc_id]) for doc_id in doc_ids)
    lengths = np.ones((len(doc_ids), width))
    gold = np.zeros((len(doc_ids), width), dtype=bool)
    instances, cells, counts = [], [], []
    for row, doc_id in enumerate(doc_ids):
        requests = sorted(by_doc[doc_id], key=lambda instance: instance.idx)
        doc = requests[0].doc
        counts.append(len(requests))
        choices = task.doc_to_choice(doc)
        lengths[row, :len(choices)] = [float(len(choice)) for choice in choices]
        for index in gold_indices(task.doc_to_target(doc), choices, bool(task.multiple_target)):
            gold[row, index] = True
        for request in requests:
            instances.append(request)
            cells.append(row * width + request.idx)
    return TaskTable(name, tuple(task._metric_fn_list), doc_ids, instances, counts, np.array(cells),
                     (len(doc_ids), width), lengths, gold)


def gold_indices(target, choices: Sequence[str], multiple_target: bool) -> List[int]:
    """The gold choices as lm-eval's process_results reads a target: an index, a choice's text, or a
    list of indices (of a task with several targets; in another, a list matches nothing); one out of
    range is no gold at all (the document then scores 0)."""
    if isinstance(target, list):
        return [index for index in target if 0 <= index < len(choices)] if multiple_target else []
    if isinstance(target, str):
        return [choices.index(target)] if target in choices else []
    return [target] if 0 <= target < len(choices) else []


def table_scores(table: TaskTable, loglikelihoods: np.ndarray) -> Dict[str, np.ndarray]:
    """metric -> its value per document, from the task's requests' log-likelihoods (in table order)."""
    lls = np.full(table.shape[0] * table.shape[1], -np.inf)
    lls[table.cell] = loglikelihoods
    lls = lls.reshape(table.shape)
    rows = np.arange(table.shape[0])
    values = {}
    for metric in table.metrics:
        # np.argmax takes the first of equal values, as lm-eval's process_results does.
        pred = np.argmax(lls / table.lengths if metric == "acc_norm" else lls, axis=1)
        values[metric] = table.gold[rows, pred].astype(float)
    return values


def check(task, table: TaskTable, results: Sequence[tuple], values: Dict[str, np.ndarray]) -> Optional[str]:
    """None when lm-eval's own process_results gives `values` for every document, else the first difference."""
    position = 0
    for row, (doc_id, count) in enumerate(zip(table.doc_ids, table.counts)):
        doc = table.instances[position].doc
        expected = task.process_results(doc, list(results[position:position + count]))
        position += count
        for metric in table.metrics:
            if float(expected[metric]) != float(values[metric][row]):
                return (f"{table.name} document {doc_id}: {metric} is {values[metric][row]:g} here and "
                        f"{float(expected[metric]):g} by lm-eval")
    return None
