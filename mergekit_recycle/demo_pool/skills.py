"""Three synthetic skills with unambiguous answers, asked as 4-way multiple choice.

Every distractor is a near miss (a sum off by 1, 2 or 10; one letter changed), so a
model must check the whole answer to pick it: scores rise gradually with skill
instead of jumping from chance to 100%. The skills use disjoint answer characters
(digits, a–p, q–z), which keeps what post-training teaches one skill from
overwriting another's output embeddings.
"""

import random
import string
from typing import Callable, Dict, List, Tuple

# (question, answer, distractors)
Example = Tuple[str, str, List[str]]

CHOICES = 4
SORT_ALPHABET = "abcdefghijklmnop"
SHIFT_ALPHABET = "qrstuvwxyz"
CHARACTERS = string.digits + string.ascii_lowercase + "+=: "


def addition(rng: random.Random) -> Example:
    """Two-digit addition; distractors are off by 1, 2 or 10."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = a + b
    distractors = {answer + d for d in (1, -1, 2, -2, 10, -10)}
    return f"{a}+{b}=", str(answer), [str(d) for d in sorted(distractors)]


def sorting(rng: random.Random) -> Example:
    """Sort 6–10 distinct letters; each distractor swaps one letter for a neighbour that is
    not in the question, so it is sorted too and only checking membership rules it out."""
    letters = rng.sample(SORT_ALPHABET, rng.randint(6, 10))
    answer = "".join(sorted(letters))
    distractors = set()
    for position in rng.sample(range(len(answer)), len(answer)):
        index = SORT_ALPHABET.index(answer[position])
        for step in rng.sample((1, -1), 2):
            if 0 <= index + step < len(SORT_ALPHABET) and SORT_ALPHABET[index + step] not in letters:
                replaced = answer[:position] + SORT_ALPHABET[index + step] + answer[position + 1 :]
                distractors.add("".join(sorted(replaced)))
                break
    return f"sort {''.join(letters)}=", answer, sorted(distractors)


def _shift(text: str, key: int) -> str:
    size = len(SHIFT_ALPHABET)
    return "".join(SHIFT_ALPHABET[(SHIFT_ALPHABET.index(c) + key) % size] for c in text)


def keyed_shift(rng: random.Random) -> Example:
    """Shift five letters of q–z by a key 1–8 (mod 10); a distractor gets one letter wrong by one."""
    key = rng.randint(1, 8)
    word = "".join(rng.choice(SHIFT_ALPHABET) for _ in range(5))
    answer = _shift(word, key)
    distractors = {
        answer[:position] + _shift(answer[position], step) + answer[position + 1 :]
        for position in range(len(answer))
        for step in (1, -1)
    }
    return f"key {key} {word}=", answer, sorted(distractors)


SKILLS: Dict[str, Callable[[random.Random], Example]] = {
    "add": addition,
    "sort": sorting,
    "shift": keyed_shift,
}


def make_examples(skill: str, count: int, rng: random.Random, exclude=frozenset()) -> List[dict]:
    """`count` distinct multiple-choice examples of `skill` whose questions are not in
    `exclude`; the answer sits at a random index among CHOICES options."""
    seen, examples = set(exclude), []
    while len(examples) < count:
        question, answer, distractors = SKILLS[skill](rng)
        if question in seen or len(distractors) < CHOICES - 1:
            continue
        seen.add(question)
        choices = rng.sample(distractors, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        examples.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    return examples
