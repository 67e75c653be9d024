"""CMA-ES, ask and tell, over the search space of `proposal.py`.

A thin, deterministic wrapper of pycma: the same seed and the same fitnesses give the same
proposals, in any process. That is what makes a run resumable by replay: a resumed run asks
again, answers each ask with the fitness in the journal, and reaches the state the killed
run was in without storing the optimizer. pycma draws from numpy's global generator, so
this class keeps a generator state of its own and swaps it in around every call; nothing
else in the process (lm-eval, torch) can shift its draws.

When pycma's own stopping rules fire (the step size collapsed, the fitness went flat, as
it does on accuracies over few questions), the search restarts from the best point so far
with the initial step size; the budget, not pycma, ends a run.
"""

import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

# Stopping rules that mean "this run of CMA-ES has converged or stalled", not "give up".
_RESTART_ON = ("tolx", "tolfun", "tolfunhist", "tolflatfitness", "tolstagnation", "tolupsigma",
               "conditioncov", "noeffectaxis", "noeffectcoord")


class CMAES:
    """Seeded CMA-ES: `ask` a generation of points, `tell` their fitnesses (lower is better)."""

    def __init__(self, x0: Sequence[float], sigma0: float, seed: int, population: Optional[int] = None,
                 inject: Sequence[Sequence[float]] = ()):
        self.sigma0 = sigma0
        self.seed = seed
        self.population = population
        self.restarts = 0
        self.generation = 0
        self.best_point: List[float] = list(x0)
        self.best_fitness = float("inf")
        self._state = np.random.RandomState(seed).get_state()
        self._es = self._start(x0)
        if inject:
            with self._own_random():
                self._es.inject([list(point) for point in inject], force=True)

    def _start(self, x0: Sequence[float]):
        import cma

        options = {
            # pycma takes seed 0 to mean "random": shift every seed by one.
            "seed": self.seed + 1 + 1_000_003 * self.restarts,
            "verbose": -9,
            "maxiter": float("inf"),
            "maxfevals": float("inf"),
        }
        if self.population is not None:
            options["popsize"] = self.population
        with self._own_random():
            return cma.CMAEvolutionStrategy(list(x0), self.sigma0, options)

    @contextmanager
    def _own_random(self) -> Iterator[None]:
        outside = np.random.get_state()
        np.random.set_state(self._state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outside)

    @property
    def population_size(self) -> int:
        return self._es.popsize

    @property
    def mean(self) -> List[float]:
        """The mean of the current search distribution: a recommendation less lucky than the best sample."""
        return [float(v) for v in self._es.mean]

    def state(self) -> Dict[str, Any]:
        """Where the search stands, as JSON: what a resumed run's replay must reach again."""
        import cma

        return {"generation": self.generation, "restarts": self.restarts, "sigma": float(self._es.sigma),
                "mean": [float(v) for v in self._es.mean], "best_point": self.best_point,
                "best_fitness": self.best_fitness if self.best_fitness != float("inf") else None,
                "cma": cma.__version__}

    def ask(self) -> List[List[float]]:
        with self._own_random():
            return [[float(v) for v in point] for point in self._es.ask()]

    def tell(self, points: Sequence[Sequence[float]], fitnesses: Sequence[float]) -> None:
        for point, fitness in zip(points, fitnesses):
            if fitness < self.best_fitness:
                self.best_point, self.best_fitness = list(point), fitness
        with self._own_random():
            self._es.tell([np.asarray(p) for p in points], list(fitnesses))
            stopped = [rule for rule in self._es.stop() if rule in _RESTART_ON]
        self.generation += 1
        if stopped:
            self.restarts += 1
            self._es = self._start(self.best_point)
