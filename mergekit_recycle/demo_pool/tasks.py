"""lm-eval task files for the demo skills: a dev split to search on and a test split
held out, as multiple-choice tasks over local JSONL files."""

import json
import random
from pathlib import Path
from typing import Dict, List, NamedTuple

from mergekit_recycle.demo_pool.skills import SKILLS, make_examples


class SkillTasks(NamedTuple):
    skill: str
    search: str
    holdout: str


# lm-eval resolves `data_files` against the working directory, but `!function` against
# the task file's folder; this loader keeps a tasks folder usable from anywhere.
_LOADER = '''"""Loads a task's JSONL file from this folder, wherever lm-eval is run from."""
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
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


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
    (tasks_dir / "toy_data.py").write_text(_LOADER)
    for skill, search, holdout in skill_tasks():
        for task, rows in ((search, examples[skill]["dev"]), (holdout, examples[skill]["test"])):
            with open(tasks_dir / f"{task}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            (tasks_dir / f"{task}.yaml").write_text(_TASK_YAML.format(task=task))
    return skill_tasks()
