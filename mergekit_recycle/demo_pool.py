"""A demo pool built offline: tiny Llama checkpoints, a character-level tokenizer, and
lm-eval multiple-choice tasks for three synthetic skills with local JSONL data.

What is here builds the pool's structure: the tokenizer, the checkpoints (freshly
initialised, one seed each), the dev/test task files and a recipe that uses them.
Training the checkpoints so that they trade skills off is the demo-pool issue's work;
until then the checkpoints are untrained and score at chance.
"""

import json
import random
import string
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.digits + string.ascii_lowercase + "+=: "

# Each skill makes (question, answer, distractors) from a random generator.
Example = Tuple[str, str, List[str]]


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = a + b
    distractors = {answer + d for d in (1, -1, 10, -10, 2, -2)} - {answer}
    return f"{a}+{b}=", str(answer), [str(d) for d in sorted(distractors)]


def _sorting(rng: random.Random) -> Example:
    letters = rng.sample("abcdefghijklmnop", 6)
    answer = "".join(sorted(letters))
    swapped = list(answer)
    i = rng.randrange(len(swapped) - 1)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    distractors = {"".join(letters), answer[::-1], "".join(swapped)} - {answer}
    return f"sort {''.join(letters)}=", answer, sorted(distractors)


_SHIFT_ALPHABET = "qrstuvwxyz"


def _shift(text: str, key: int) -> str:
    return "".join(_SHIFT_ALPHABET[(_SHIFT_ALPHABET.index(c) + key) % len(_SHIFT_ALPHABET)] for c in text)


def _keyed_shift(rng: random.Random) -> Example:
    key = rng.randint(1, 8)
    word = "".join(rng.choice(_SHIFT_ALPHABET) for _ in range(5))
    answer = _shift(word, key)
    distractors = {_shift(word, key + d) for d in (1, -1, 2)} | {word}
    return f"key {key} {word}=", answer, sorted(distractors - {answer})


SKILLS: Dict[str, Callable[[random.Random], Example]] = {
    "add": _addition,
    "sort": _sorting,
    "shift": _keyed_shift,
}
CHOICES = 4


def make_examples(skill: str, count: int, rng: random.Random) -> List[dict]:
    """`count` distinct multiple-choice examples of a skill, with the answer at a random index."""
    seen, examples = set(), []
    while len(examples) < count:
        question, answer, distractors = SKILLS[skill](rng)
        if question in seen or len(distractors) < CHOICES - 1:
            continue
        seen.add(question)
        choices = rng.sample(distractors, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        examples.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    return examples


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
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(tasks_dir: Path, seed: int, dev_size: int, test_size: int) -> List[Tuple[str, str, str]]:
    """Write a dev (search) and a test (holdout) task per skill; return (skill, dev, test) names."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "toy_data.py").write_text(_LOADER)
    names = []
    for index, skill in enumerate(SKILLS):
        rng = random.Random(seed * 1000 + index)
        examples = make_examples(skill, dev_size + test_size, rng)
        for split, rows in (("dev", examples[:dev_size]), ("test", examples[dev_size:])):
            task = f"toy_{skill}_{split}"
            with open(tasks_dir / f"{task}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            (tasks_dir / f"{task}.yaml").write_text(_TASK_YAML.format(task=task))
        names.append((skill, f"toy_{skill}_dev", f"toy_{skill}_test"))
    return names


def char_tokenizer():
    """A character-level tokenizer saved and loaded as an ordinary Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    # lm-eval relies on the tokenizer to add BOS, as Llama's does.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_llama(tokenizer, seed: int, hidden_size: int = 32, layers: int = 2):
    """A freshly initialised LlamaForCausalLM small enough to train and merge in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_checkpoint(model, tokenizer, directory: Path) -> Path:
    """Save as a Hugging Face checkpoint directory: safetensors, config, tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def recipe_text(name: str, checkpoints: Sequence[str], tasks: Sequence[Tuple[str, str, str]]) -> str:
    """A recipe over `checkpoints` and `tasks`, with paths relative to the pool folder."""
    lines = [f"name: {name}", "pool:"]
    lines += [f"  - path: {checkpoint}" for checkpoint in checkpoints]
    lines += ["base: null", "tasks:"]
    for skill, dev, test in tasks:
        lines += [f"  - name: {skill}", f"    search: {dev}", f"    holdout: {test}", "    metric: acc", "    weight: 1.0"]
    lines += [
        "task_paths: [tasks]",
        "search: {budget: 30, population: null, sigma0: 0.25, seed: 0, scale: 1.0}",
        "merge: {dtype: float32, device: auto}",
        f"output: {{run_dir: runs/{name}, hub_repo: null, private: true}}",
    ]
    return "\n".join(lines) + "\n"


def build_pool(directory: Path, seed: int = 0, checkpoints: int = 4, dev_size: int = 200, test_size: int = 500) -> Path:
    """Build checkpoints, tasks and `recipe.yaml` under `directory`; return the recipe path."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    names = []
    for index in range(checkpoints):
        name = f"post-{index}"
        save_checkpoint(tiny_llama(tokenizer, seed=seed * 100 + index), tokenizer, directory / name)
        names.append(name)
    tasks = write_tasks(directory / "tasks", seed, dev_size, test_size)
    recipe = directory / "recipe.yaml"
    recipe.write_text(recipe_text("toy-recycle", names, tasks))
    return recipe


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".toy-pool")
    print(f"built {build_pool(target)}")
