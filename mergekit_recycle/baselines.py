"""The merges the search must beat: every single checkpoint, the uniform soup and the greedy soup.

Greedy soup (Wortsman et al. 2022, "Model soups"): sort the checkpoints by search objective,
then add each one to the soup only if the soup's search objective does not drop.
"""

from typing import Callable, Dict, List, Optional, Tuple

from mergekit_recycle.proposal import Merge

# (merge, kind, name) -> the search objective, or None when the merge failed.
ScoreSearch = Callable[[Merge, str, str], Optional[float]]


def single(names: List[str], name: str) -> Merge:
    return Merge.of(names, [name])


def first_baselines(names: List[str]) -> List[Tuple[str, str, Merge]]:
    """(kind, name, merge) of the baselines that depend on nothing else: every single checkpoint and the
    uniform soup. They are scored as one batch; the greedy soup follows from their scores."""
    return [("checkpoint", name, single(names, name)) for name in names] + [("uniform", "uniform soup", Merge.of(names))]


def greedy_soup(names: List[str], objectives: Dict[str, float], score: ScoreSearch,
                say: Callable[[str], None] = lambda line: None) -> Merge:
    """The greedy soup, given each checkpoint's search objective (failed ones are left out).

    Each step is said with its outcome: a step's score is the score of the soup with that checkpoint
    added, which only becomes the soup's when the checkpoint is kept.
    """
    order = sorted(objectives, key=lambda name: (-objectives[name], names.index(name)))
    if not order:
        return Merge.of(names)
    soup, best = [order[0]], objectives[order[0]]
    for name in order[1:]:
        value = score(Merge.of(names, soup + [name]), "greedy-step", f"greedy soup + {name}")
        kept = value is not None and value >= best
        outcome = "failed" if value is None else f"search objective {value:.4f}"
        say(f"greedy soup + {name}: {outcome} against the soup's {best:.4f}: {'kept' if kept else 'dropped'}")
        if kept:
            soup, best = soup + [name], value
    say(f"greedy soup: {' + '.join(soup)} (search objective {best:.4f})")
    return Merge.of(names, soup)
