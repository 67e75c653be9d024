"""lm-eval task files for the demo skills: a dev split to search on and a test split
held out, as multiple-choice tasks over local JSONL files, and (`write_generative_tasks`)
their generate_until twins over the same files."""

import json
import random
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

from mergekit_recycle.demo_pool.skills import SKILLS, make_examples


class SkillTasks(NamedTuple):
    skill: str
    search: str
    holdout: str


# lm-eval resolves `data_files` against the working directory, but `!function` against
# the task file's folder; this loader keeps a tasks folder usable from anywhere.
LOADER = '''"""Loads a task's JSONL file from this folder, wherever lm-eval is run from."""
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file, **_metadata):
    return datasets.load_dataset("json", data_files={"test": str(HERE / data_file)})
'''

_TASK_YAML = """task: {task}
custom_dataset: !function toy_data.load_jsonl
dataset_kwargs:
  data_file: {task}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: {delimiter}
metric_list:
{metrics}metadata:
  version: 1.0
"""
_METRIC_YAML = "  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true\n"


def multiple_choice_yaml(task: str, target_delimiter: str = "", metrics: Sequence[str] = ("acc",)) -> str:
    """The lm-eval YAML of a multiple-choice task over `<task>.jsonl` beside it (loaded by LOADER, as
    toy_data.py): question, choices, the answer's index."""
    return _TASK_YAML.format(task=task, delimiter=json.dumps(target_delimiter),
                             metrics="".join(_METRIC_YAML.format(metric=metric) for metric in metrics))


def skill_tasks() -> List[SkillTasks]:
    """The dev and test task names of every skill."""
    return [SkillTasks(skill, f"toy_{skill}_dev", f"toy_{skill}_test") for skill in SKILLS]


def evaluation_examples(seed: int, dev_size: int, test_size: int) -> Dict[str, Dict[str, List[dict]]]:
    """Per skill, disjoint `dev` and `test` examples drawn from the pool's seed."""
    examples = {}
    for index, skill in enumerate(SKILLS):
        drawn = make_examples(skill, dev_size + test_size, random.Random(seed * 1000 + index))
        examples[skill] = {"dev": drawn[:dev_size], "test": drawn[dev_size:]}
    return examples


def write_tasks(tasks_dir: Path, examples: Dict[str, Dict[str, List[dict]]]) -> List[SkillTasks]:
    """Write a dev (search) and a test (holdout) task per skill from `examples` (as
    `evaluation_examples` returns them); return their names."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "toy_data.py").write_text(LOADER)
    for skill, search, holdout in skill_tasks():
        for task, rows in ((search, examples[skill]["dev"]), (holdout, examples[skill]["test"])):
            with open(tasks_dir / f"{task}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            (tasks_dir / f"{task}.yaml").write_text(multiple_choice_yaml(task))
    return skill_tasks()


# The generative twin of a skill's task: the model writes the answer after the question, as it was
# trained to (question, answer, end of sequence: no separator), and exact_match compares it with the
# right choice. Few-shot examples (num_fewshot) are "question answer" pairs joined by a space, a
# character the answers never hold: generation stops at the first space or at the end of sequence.
_GENERATIVE_TASK_YAML = """task: {task}
custom_dataset: !function toy_data.load_jsonl
dataset_kwargs:
  data_file: {data}.jsonl
test_split: test
fewshot_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: !function toy_generative.answer
target_delimiter: ""
fewshot_delimiter: " "
generation_kwargs:
  until: [" "]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The generative tasks' target: a function, not a template (`{{choices[answer]}}`), which lm-eval would
# compile again for every document of every candidate.
_GENERATIVE_TARGET = '''"""The generative demo tasks' target: the text of the right choice."""


def answer(doc):
    return doc["choices"][doc["answer"]]
'''

# The longest answer of each skill (add: 99+99, sort: 10 letters, shift: 5), plus one token for the end.
_ANSWER_TOKENS = {"add": 3 + 1, "sort": 10 + 1, "shift": 5 + 1}


def generative_skill_tasks() -> List[SkillTasks]:
    """The generative dev and test task names of every skill (`write_generative_tasks` writes them)."""
    return [SkillTasks(skill, f"toy_{skill}_gen_dev", f"toy_{skill}_gen_test") for skill in SKILLS]


def write_generative_tasks(tasks_dir: Path) -> List[SkillTasks]:
    """Write the generate_until twin of every skill's dev and test task (toy_<skill>_gen_dev,
    toy_<skill>_gen_test; metric exact_match) into a demo pool's tasks folder, over the JSONL files
    `write_tasks` wrote there; return their names. The pool's files and fingerprint stay as they
    were: the twins are YAML files that read the same data."""
    tasks_dir = Path(tasks_dir)
    (tasks_dir / "toy_generative.py").write_text(_GENERATIVE_TARGET)
    for (skill, search, holdout), (_, dev, test) in zip(generative_skill_tasks(), skill_tasks()):
        for task, data in ((search, dev), (holdout, test)):
            if not (tasks_dir / f"{data}.jsonl").is_file():
                raise FileNotFoundError(f"{tasks_dir / (data + '.jsonl')} is missing: write_tasks writes it "
                                        "(build the pool first)")
            (tasks_dir / f"{task}.yaml").write_text(
                _GENERATIVE_TASK_YAML.format(task=task, data=data, max_gen_toks=_ANSWER_TOKENS[skill]))
    return generative_skill_tasks()
