"""Evaluating a batch on Ray: one actor per GPU (or per few CPU cores), each with a resident model of its own.

`optimize --workers N` (or `--ray-address`) evaluates every batch of the search loop here
instead of in its own process. Each actor builds its resident model, scorers and prepared
requests once (a `ResidentEvaluator`, as the serial run has) and keeps them: only a merge
(weights and scale) travels to an actor, and only its scores come back. The driver keeps the
journal, CMA-ES and the run folder; the actors never write.

The pool on every node: Hub checkpoints are downloaded by each node from the commit SHAs the
driver pinned (the driver sends the pins, not the files); local folders must exist at the same
path on every node, which an actor checks when it starts. Several workers on one node read
the checkpoints from disk for each candidate instead of each keeping a private copy in memory:
the node's page cache holds one copy for all of them.

Faults: a worker process that dies (killed, out of memory, its node lost) is replaced and its
candidate tried once more on the replacement; a candidate that kills its worker twice is a
failed candidate. A replacement that cannot be placed within MERGEKIT_RECYCLE_RAY_PLACEMENT_SECONDS
(its node gone and no room elsewhere) leaves the run with one worker fewer, and says so.
"""

import contextlib
import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from mergekit_recycle import constants
from mergekit_recycle.candidate import FATAL_ERRORS, BatchSize, Outcome, attempt
from mergekit_recycle.errors import PoolError, RayNotInstalledError, RayWorkerError, one_line
from mergekit_recycle.pool import Pool
from mergekit_recycle.proposal import Merge
from mergekit_recycle.recipe import Recipe
from mergekit_recycle.records import Split, WorkersRecord

# A worker place whose actors keep dying (out of memory at every load, say) is given up after this many.
MAX_RESTARTS = 3


def ray_module():
    """Ray, imported only when asked for; one line that says how to install it when it is not there."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError() from None
    return ray


class EvaluationWorker:
    """A Ray actor: one resident model on one device, scoring the merges it is sent."""

    def __init__(self, index: int, threads: int):
        import torch

        self.index = index
        torch.set_num_threads(threads)
        self.evaluator = None

    def where(self) -> Dict[str, Any]:
        """The node this worker runs on, and its process."""
        import ray

        return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid(),
                "gpus": [str(gpu) for gpu in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]}

    def load(self, recipe: Recipe, source: Path, pool: Pool, pins: Dict[str, Any], device: str,
             in_memory: Optional[bool], batch_size: BatchSize) -> Tuple[str, Any]:
        """Build the resident model and scorers once; ("ok", description) or ("fatal", the error)."""
        from mergekit_recycle.candidate import ResidentEvaluator

        try:
            pool = self._node_pool(recipe, source, pool, pins)
            self.evaluator = ResidentEvaluator(recipe, pool, device, source, in_memory=in_memory, batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001 - the driver raises it as the run's one-line error
            return "fatal", _on_node(exc)
        return "ok", self.evaluator.describe()

    def _node_pool(self, recipe: Recipe, source: Path, pool: Pool, pins: Dict[str, Any]) -> Pool:
        """The pool as this node has it: local folders at the driver's paths, Hub checkpoints from the pinned SHAs."""
        from mergekit_recycle.pool import resolve_pool

        for checkpoint in pool.inputs:
            if checkpoint.sha is None and not checkpoint.path.is_dir():
                raise PoolError(source, checkpoint.location, str(checkpoint.path),
                                "does not exist on this node; every Ray node needs the pool's local folders at the same "
                                "path (or use Hub entries)")
        for path in recipe.task_paths:
            if not path.exists():
                raise PoolError(source, "task_paths", str(path), "does not exist on this node; every Ray node needs "
                                "the recipe's task_paths at the same path")
        if all(checkpoint.sha is None for checkpoint in pool.inputs):
            return pool
        return resolve_pool(recipe, source, pins=pins)

    def evaluate(self, merge: Merge, split: Split) -> Tuple[str, Any]:
        """("ok", its Outcome), or ("fatal", an error that fails every candidate alike)."""
        try:
            return "ok", attempt(self.evaluator.evaluate, merge, split)
        except FATAL_ERRORS as exc:
            return "fatal", _on_node(exc)


def _on_node(exc: Exception) -> Exception:
    """`exc` with the node named: the driver's one line must say which node lacks what."""
    import ray

    node = f"{ray.util.get_node_ip_address()} ({socket.gethostname()})"
    if isinstance(exc, PoolError):
        return PoolError(exc.path, exc.location, exc.checkpoint, f"on Ray node {node}: {exc.message}", tensor=exc.tensor)
    if isinstance(exc, FATAL_ERRORS):
        return exc
    return RayWorkerError(node, f"{type(exc).__name__}: {one_line(exc, 300)}")


@dataclass
class Slot:
    """One worker place: the actor in it now, and what it has done since the run started."""

    index: int
    actor: Any = None
    # placing (Ray places the actor), loading (it builds its model), idle, busy (a candidate of the current batch),
    # draining (a candidate of a batch given up, its result to be dropped), lost (given up)
    state: str = "placing"
    node: Optional[str] = None
    node_id: Optional[str] = None
    host: Optional[str] = None
    pid: Optional[int] = None
    device: str = "cpu"
    deadline: float = 0.0  # when a placing actor is given up
    dispatched: float = 0.0  # time.perf_counter() when its candidate was sent
    evaluations: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    deaths_in_a_row: int = 0  # since its last evaluation: a place whose actors keep dying is given up
    describe: str = ""

    def report(self) -> Dict[str, Any]:
        return {"index": self.index, "node": self.node, "node_id": self.node_id, "host": self.host,
                "device": self.device, "evaluations": self.evaluations, "busy_seconds": round(self.busy_seconds, 3),
                "restarts": self.restarts, "lost": self.state == "lost"}


@dataclass
class RayEvaluator:
    """A CandidateEvaluator whose batches are spread over Ray actors (see the module docstring)."""

    recipe: Recipe
    source: Path
    pool: Pool
    pins: Dict[str, Any]
    device: str  # what every worker evaluates on: cuda (one GPU each) or cpu
    workers: int
    cpus_per_worker: int
    in_memory: Optional[bool] = None
    batch_size: BatchSize = constants.DEFAULT_BATCH_SIZE
    say: Callable[[str], None] = lambda line: None
    started_ray: bool = False  # whether this run started the Ray instance it uses (and shuts it down)
    slots: List[Slot] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    idle_share: float = 0.0
    # Every object reference in flight (a placement, a load, a candidate), with its slot: kept across batches.
    pending: Dict[Any, Slot] = field(default_factory=dict)

    # -- starting -------------------------------------------------------------------------

    @classmethod
    def start(cls, recipe: Recipe, source: Path, pool: Pool, pins: Dict[str, Any], device: str,
              workers: Optional[int], address: Optional[str], cpus_per_worker: Optional[int],
              in_memory: Optional[bool] = None, batch_size: BatchSize = constants.DEFAULT_BATCH_SIZE,
              say: Callable[[str], None] = lambda line: None) -> "RayEvaluator":
        """Join the cluster at `address` (or start a local Ray instance for `workers` workers), place the
        workers, and load the pool on each: when this returns, the workers placed are ready to evaluate."""
        ray = ray_module()
        started_ray = False
        address = address or constants.ray_address()
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                           configure_logging=True)
            if address:
                try:
                    ray.init(address=address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise RayWorkerError("the cluster", f"cannot join the Ray cluster at {address} "
                                         f"({one_line(exc, 200)}): check --ray-address (or RAY_ADDRESS) and that "
                                         "`ray start --head` runs there") from None
            else:
                count = workers or 1
                cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // count)
                # address="local": a new instance, never one that a stale /tmp/ray/ray_current_cluster names.
                ray.init(address="local", num_cpus=count * cpus, **options)
                started_ray = True
        try:
            use_gpus = _wants_gpus(device, ray.cluster_resources())
            # No worker may need more than one node has: the smallest node's CPUs bound the default.
            node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
            smallest = max(1, min((cpus for cpus in node_cpus if cpus), default=1))
            if cpus_per_worker is None:
                cpus_per_worker = 1 if use_gpus else max(1, min(smallest, sum(node_cpus) // (workers or sum(node_cpus) or 1)))
            if workers is None:  # as many as the cluster has room for
                gpus = int(ray.cluster_resources().get("GPU", 0))
                workers = gpus if use_gpus else max(1, sum(cpus // cpus_per_worker for cpus in node_cpus))
            evaluator = cls(recipe, source, pool, pins, "cuda" if use_gpus else "cpu", workers, cpus_per_worker,
                            in_memory, batch_size, say, started_ray)
        except BaseException:
            if started_ray:
                ray.shutdown()
            raise
        try:
            evaluator._start_workers()
        except BaseException:
            evaluator.close()
            raise
        return evaluator

    def _actor_class(self):
        ray = ray_module()
        # The scoring switches (constants.SCORING_VARIABLES) as this process has them, on every node.
        switches = {name: os.environ[name] for name in constants.SCORING_VARIABLES if name in os.environ}
        return ray.remote(num_cpus=self.cpus_per_worker, num_gpus=1 if self.device == "cuda" else 0,
                          max_restarts=0, max_concurrency=1,
                          runtime_env={"env_vars": switches} if switches else None)(EvaluationWorker)

    def _place(self, slot: Slot) -> None:
        """Start an actor for `slot`; Ray places it, then `_arrived` has it load the pool."""
        slot.actor = self._actor_class().remote(slot.index, self.cpus_per_worker)
        slot.state, slot.deadline = "placing", time.monotonic() + constants.ray_placement_seconds()
        self.pending[slot.actor.where.remote()] = slot

    def _load(self, slot: Slot, where: Dict[str, Any]) -> None:
        """Record where `slot`'s actor runs and have it load the pool there."""
        slot.node, slot.node_id, slot.host, slot.pid = where["node"], where["node_id"], where["host"], where["pid"]
        slot.device = f"cuda:{where['gpus'][0]}" if self.device == "cuda" and where["gpus"] else self.device
        slot.state = "loading"
        # Several workers on one node share the page cache, not private copies of the pool.
        on_node = sum(1 for other in self.slots if other.node_id == slot.node_id and other.state != "lost")
        in_memory = self.in_memory if self.in_memory is not None else (False if on_node > 1 else None)
        self.pending[slot.actor.load.remote(self.recipe, self.source, self.pool, self.pins, self.device, in_memory,
                                            self.batch_size)] = slot

    def _start_workers(self) -> None:
        """Place every worker (the places first, so that each worker knows how many share its node), then load."""
        ray = ray_module()
        self.slots = [Slot(index) for index in range(self.workers)]
        for slot in self.slots:
            self._place(slot)
        wheres: Dict[int, Dict[str, Any]] = {}
        while self.pending:
            timeout = max(0.0, min(slot.deadline for slot in self.pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
            for ref in ready:
                slot = self.pending.pop(ref)
                try:
                    wheres[slot.index] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._lose(slot, f"it died before it started ({type(exc).__name__})")
                    continue
                slot.node_id = wheres[slot.index]["node_id"]
            if not ready:
                for slot in list(self.pending.values()):
                    self._lose(slot, "Ray could not place it")
                self.pending.clear()
        for slot in self.slots:
            if slot.state == "placing":
                self._load(slot, wheres[slot.index])
        while any(slot.state == "loading" for slot in self.slots):
            self._next(batch={})
        if not self.alive:
            resources = ray.cluster_resources()
            raise RayWorkerError("the cluster", f"no worker could be placed and started in "
                                 f"{constants.ray_placement_seconds():g} s ({constants.RAY_PLACEMENT_VARIABLE}): each "
                                 f"needs {self.cpus_per_worker} CPU{'s' if self.cpus_per_worker > 1 else ''}"
                                 + (" and 1 GPU" if self.device == "cuda" else "") + f"; the cluster has "
                                 f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs")
        self.started = time.monotonic()  # utilisation counts from when the workers are ready

    def _lose(self, slot: Slot, why: str) -> None:
        ray = ray_module()
        if slot.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.state = None, "lost"
        for ref in [ref for ref, owner in self.pending.items() if owner is slot]:
            del self.pending[ref]
        where = f" on {slot.node}" if slot.node else ""
        self.say(f"Ray worker {slot.index}{where} lost ({why}): continuing with {self.alive} "
                 f"worker{'s' if self.alive != 1 else ''}")

    def _replace(self, slot: Slot, exc: BaseException) -> None:
        """A new actor in the place of one that died; it is placed and loads while the others go on."""
        slot.restarts += 1
        slot.deaths_in_a_row += 1
        if slot.deaths_in_a_row > MAX_RESTARTS:
            self._lose(slot, f"its actor died {slot.deaths_in_a_row} times in a row, the last time: "
                       f"{type(exc).__name__}")
            return
        self.say(f"Ray worker {slot.index} on {slot.node} died ({type(exc).__name__}); starting another in its place")
        self._place(slot)

    # -- what the search loop sees ---------------------------------------------------------

    def describe(self) -> str:
        nodes = Counter((slot.node_id, slot.node) for slot in self.slots if slot.state != "lost")
        per_node = ", ".join(f"{node}: {count}" for (_, node), count in nodes.items())
        threads = "" if self.device == "cuda" else f", {self.cpus_per_worker} thread{'s' if self.cpus_per_worker > 1 else ''} each"
        memory = next((slot.describe for slot in self.slots if slot.describe), "")
        return (f"Ray: {sum(nodes.values())} workers on {len(nodes)} node{'s' if len(nodes) > 1 else ''} ({per_node}), "
                f"{self.device}{threads}; {memory}")

    @property
    def alive(self) -> int:
        """Workers not given up (some may be starting again in the place of one that died)."""
        return sum(1 for slot in self.slots if slot.state != "lost")

    @property
    def busy(self) -> int:
        return sum(1 for slot in self.slots if slot.state == "busy")

    def note_population(self, population: int) -> None:
        """Say how much of each generation's worker time is idle when the workers do not divide the population."""
        if not self.alive:
            return
        rounds = -(-population // self.alive)
        idle = rounds * self.alive - population
        self.idle_share = idle / (rounds * self.alive)
        if idle:
            self.say(f"Ray: {self.alive} workers and a population of {population}: each generation leaves {idle} of "
                     f"{rounds * self.alive} worker slots idle ({self.idle_share:.0%}); a population of "
                     f"{rounds * self.alive} (search.population) would use them all")

    def evaluate_many(self, merges: Sequence[Merge], split: Split) -> Iterator[Tuple[int, Outcome]]:
        """Each merge on the next free worker; outcomes in the order they arrive."""
        queue: Deque[int] = deque(range(len(merges)))
        tries: Counter = Counter()
        batch: Dict[Any, int] = {}  # object ref of a candidate in flight -> its index in `merges`
        try:
            self._check_idle()
            while queue or batch:
                for slot in self.slots:
                    if queue and slot.state == "idle":
                        index = queue.popleft()
                        tries[index] += 1
                        slot.state, slot.dispatched = "busy", time.perf_counter()
                        ref = slot.actor.evaluate.remote(merges[index], split)
                        self.pending[ref], batch[ref] = slot, index
                if not self.pending:
                    raise RayWorkerError("the cluster", "every Ray worker is lost; the journal keeps every result so "
                                         "far: rerun the same command once the cluster has room")
                arrived = self._next(batch)
                if arrived is None:
                    continue
                index, outcome = arrived
                if outcome is None:  # its worker died
                    if tries[index] < 2:
                        queue.appendleft(index)  # once more, on the next free worker
                        continue
                    outcome = Outcome(error="RayWorkerError: the worker evaluating it died twice")
                yield index, outcome
        finally:
            for ref, index in batch.items():  # a batch given up (the run stopped): its results are dropped
                if ref in self.pending:
                    self.pending[ref].state = "draining"

    def _check_idle(self) -> None:
        """Replace idle workers whose actor died since the last batch (its node lost, say), before a candidate is
        sent to them: a candidate's two tries are for candidates that kill their worker."""
        ray = ray_module()
        idle = {slot.actor.where.remote(): slot for slot in self.slots if slot.state == "idle"}
        for ref, slot in idle.items():
            try:
                ray.get(ref, timeout=60)
            except ray.exceptions.RayError as exc:
                self._replace(slot, exc)

    def _next(self, batch: Dict[Any, int]) -> Optional[Tuple[int, Optional[Outcome]]]:
        """Wait for the next object in flight and act on it: a placement loads, a load makes its worker idle,
        a candidate's result is returned as (index, outcome), or (index, None) when its worker died."""
        ray = ray_module()
        placing = [slot.deadline for slot in self.pending.values() if slot.state == "placing"]
        timeout = max(0.0, min(placing) - time.monotonic()) if placing else None
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not ready:
            for ref, slot in list(self.pending.items()):
                if slot.state == "placing" and time.monotonic() >= slot.deadline:
                    self._lose(slot, "its node is gone and no other node has room for it")
            return None
        ref = ready[0]
        slot, index = self.pending.pop(ref), batch.pop(ref, None)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # our actor code failed outside a candidate
            raise RayWorkerError(f"{slot.node} ({slot.host})", one_line(exc.cause or exc, 300)) from None
        except ray.exceptions.RayError as exc:  # the actor died: killed, out of memory, its node lost
            self._replace(slot, exc)
            return (index, None) if index is not None else None
        if slot.state == "placing":
            self._load(slot, result)
            return None
        kind, value = result
        if kind == "fatal":  # the recipe or the pool is wrong: every candidate would fail alike
            raise value
        if slot.state == "loading":
            slot.describe, slot.state = value, "idle"
            return None
        was_draining, slot.state = slot.state == "draining", "idle"
        if was_draining or index is None:
            return None
        slot.evaluations += 1
        slot.deaths_in_a_row = 0
        slot.busy_seconds += time.perf_counter() - slot.dispatched
        return index, Outcome(evaluation=value.evaluation, error=value.error, seconds=value.seconds, worker=slot.index)

    def statistics(self, journaled_at: str) -> WorkersRecord:
        """What each worker did since the run started, as the journal keeps it."""
        return WorkersRecord(time=journaled_at, wall_seconds=round(time.monotonic() - self.started, 3),
                             workers=[slot.report() for slot in self.slots], idle_share=round(self.idle_share, 4))

    def close(self) -> None:
        """Stop the workers; shut Ray down when this run started it. Never raises: it runs while a run stops."""
        ray = ray_module()
        for slot in self.slots:
            if slot.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
                slot.actor = None
        self.pending.clear()
        if self.started_ray and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()


def _wants_gpus(device: str, resources: Dict[str, float]) -> bool:
    """Whether the workers take one GPU each: `auto` when the cluster has GPUs, `cuda` always (refused without)."""
    from mergekit_recycle.errors import SettingError

    gpus = resources.get("GPU", 0)
    if device.startswith("cuda"):
        if not gpus:
            raise SettingError("--device", device, "a device the Ray cluster has: it has no GPU (try auto or cpu)")
        return True
    return device == "auto" and gpus > 0
