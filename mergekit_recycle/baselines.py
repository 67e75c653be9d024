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


def baseline_merges(names: List[str], score: ScoreSearch) -> Dict[str, Tuple[str, Merge]]:
    """name -> (kind, merge) of every baseline, scoring each on the search split as it goes."""
    baselines: Dict[str, Tuple[str, Merge]] = {}
    objectives: Dict[str, float] = {}
    for name in names:
        merge = single(names, name)
        baselines[name] = ("checkpoint", merge)
        value = score(merge, "checkpoint", name)
        if value is not None:
            objectives[name] = value
    uniform = Merge.of(names)
    baselines["uniform soup"] = ("uniform", uniform)
    score(uniform, "uniform", "uniform soup")
    baselines["greedy soup"] = ("greedy", greedy_soup(names, objectives, score))
    return baselines


def greedy_soup(names: List[str], objectives: Dict[str, float], score: ScoreSearch) -> Merge:
    """The greedy soup, given each checkpoint's search objective (failed ones are left out)."""
    order = sorted(objectives, key=lambda name: (-objectives[name], names.index(name)))
    if not order:
        return Merge.of(names)
    soup, best = [order[0]], objectives[order[0]]
    for name in order[1:]:
        value = score(Merge.of(names, soup + [name]), "greedy-step", f"greedy soup + {name}")
        if value is not None and value >= best:
            soup, best = soup + [name], value
    return Merge.of(names, soup)
