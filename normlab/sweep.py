"""Train every config of a sweep that the run store does not hold yet.

A sweep trains its runs on one of three backends: ``in-process`` (one run at a time in this
process), ``process`` (a local pool of worker processes) or ``ray`` (Ray tasks on a local or
remote Ray instance). Workers only train and return results. Only the calling process writes
the run store, and it commits each run as soon as its result comes back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, wait
from concurrent.futures import ProcessPoolExecutor as _ProcessPool
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .store import RunRecord, RunStore
from .train import batched
from .train.config import TrainConfig
from .train.loop import train_classifier

logger = logging.getLogger(__name__)

BACKENDS = ("in-process", "process", "ray")
# attempts of one run in one sweep: the first and one retry
MAX_ATTEMPTS = 2
# exceptions of a single run that mark it failed; any other exception stops the sweep
RUN_ERRORS = (ValueError, RuntimeError, FloatingPointError)
RAY_INSTALL_HINT = "install it with `pip install 'normlab[ray]'` (or `pip install ray`)"


def unique(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """Return ``configs`` without repeated keys, in their first order."""
    seen: dict[str, TrainConfig] = {}
    for config in configs:
        seen.setdefault(config.key(), config)
    return list(seen.values())


# -- trainers ------------------------------------------------------------------------------


def _classify(config: TrainConfig, data):
    # looked up at call time, so tests can replace train_classifier in this module
    return train_classifier(config, data)


TRAINERS: dict[str, Callable] = {TrainConfig.task: _classify}


def register_trainer(task: str, trainer: Callable) -> None:
    """Train configs whose ``task`` is ``task`` with ``trainer(config, data)``."""
    TRAINERS[task] = trainer


@dataclass(frozen=True)
class GroupTrainer:
    """A trainer that trains several configs of one task at once.

    Attributes:
        group_key: ``group_key(config)`` returns a hashable key, and configs with equal keys
            may be trained together; None trains the config alone.
        trainer: ``trainer(configs, data)`` returns one ``RunResult`` per config, in the
            order of ``configs``.
        max_group: the maximum number of configs in one call of ``trainer``.
    """

    group_key: Callable[[TrainConfig], Optional[Hashable]]
    trainer: Callable
    max_group: int = 16


GROUP_TRAINERS: dict[str, GroupTrainer] = {}


def register_group_trainer(
    task: str, group_key: Callable, trainer: Callable, max_group: int = 16
) -> None:
    """Train configs of ``task`` with equal ``group_key(config)`` together with ``trainer``.

    ``trainer(configs, data)`` gets at most ``max_group`` configs and returns their
    ``RunResult`` objects in the same order. If it raises, the sweep logs the error and
    trains the configs of that group one by one with the trainer of ``register_trainer``.
    """
    if not isinstance(max_group, int) or max_group < 1:
        raise ValueError(f"max_group must be a positive integer, got {max_group!r}")
    if not callable(group_key) or not callable(trainer):
        raise TypeError("group_key and trainer must be callables, got "
                        f"{type(group_key).__name__} and {type(trainer).__name__}")
    GROUP_TRAINERS[task] = GroupTrainer(group_key, trainer, max_group)


def _classify_group(configs, data):
    # looked up at call time, like _classify
    return batched.train_classifiers(configs, data)


# MLP runs that differ only in lr, init scale, seed or weight decay train as one batched
# computation. Every such config goes through it, alone or in a group, so its numbers do
# not depend on which other runs were pending.
register_group_trainer(
    TrainConfig.task, batched.group_key, _classify_group, max_group=batched.MAX_GROUP
)


def _single_trainer(config) -> Callable:
    try:
        return TRAINERS[config.task]
    except KeyError:
        raise ValueError(
            f"no trainer registered for task {config.task!r}; registered tasks: "
            f"{', '.join(sorted(TRAINERS))}. Import the module that calls register_trainer"
        ) from None


# -- units of work -------------------------------------------------------------------------


@dataclass
class _Unit:
    """One piece of work for a backend: a single run, or a group for a group trainer."""

    configs: list
    trainer: Callable
    grouped: bool
    run_ids: list = field(default_factory=list)
    # attempts counted in this sweep (a group attempt is not counted here, see _fall_back)
    attempts: int = 0
    # False when the unit goes back to a backend without a new attempt (a pool broken by
    # another run's worker), so the store's attempts column stays as it is
    count_attempt: bool = True

    def describe(self) -> str:
        if self.grouped:
            return f"group of {len(self.configs)} {self.configs[0].task} runs"
        return _describe(self.configs[0])


def _describe(config) -> str:
    return f"{config.norm} lr={config.lr:.3g} seed={config.seed}"


def plan_units(pending: Sequence) -> list[_Unit]:
    """Split ``pending`` into units: groups for a registered group trainer, the rest alone.

    The configs of one group key are split into the fewest groups of at most
    ``max_group``, of near-equal sizes (40 configs with max_group 16 give 14, 13 and 13),
    in their first order. Units are ordered by the position of their first config.
    """
    units: list[tuple[int, _Unit]] = []
    keyed: dict[tuple, list[tuple[int, TrainConfig]]] = {}
    for position, config in enumerate(pending):
        group = GROUP_TRAINERS.get(config.task)
        key = None if group is None else group.group_key(config)
        if key is None:
            units.append((position, _Unit([config], _single_trainer(config), grouped=False)))
        else:
            keyed.setdefault((config.task, key), []).append((position, config))
    for (task, _), members in keyed.items():
        group = GROUP_TRAINERS[task]
        count = -(-len(members) // group.max_group)
        for chunk in range(count):
            start = -(-chunk * len(members) // count)
            end = -(-(chunk + 1) * len(members) // count)
            part = members[start:end]
            unit = _Unit([config for _, config in part], group.trainer, grouped=True)
            units.append((part[0][0], unit))
    units.sort(key=lambda item: item[0])
    return [unit for _, unit in units]


def train_unit(trainer: Callable, configs: list, data, grouped: bool) -> tuple:
    """Train one unit and return ``("ok", results)`` or ``("error", traceback_text)``.

    A single run reports the exceptions in ``RUN_ERRORS``, and any other exception
    propagates. A group reports any ``Exception``, because the sweep then trains its
    configs one by one.
    """
    caught = Exception if grouped else RUN_ERRORS
    try:
        if grouped:
            results = list(trainer(list(configs), data))
            if len(results) != len(configs):
                raise ValueError(f"group trainer returned {len(results)} results for "
                                 f"{len(configs)} configs; it must return one per config")
        else:
            results = [trainer(configs[0], data)]
    except caught as error:
        return "error", "".join(traceback.format_exception(error))
    return "ok", results


# -- backends ------------------------------------------------------------------------------
#
# An executor trains units, and its wait() returns (unit, outcome) pairs. An outcome is
# ("ok", results) or ("error", traceback_text). After the worker process died it is
# ("died", message, retries), where retries is the number of times the backend itself
# already ran the unit again. A unit that goes back unchanged, because another unit broke
# the pool, gets ("resubmit",).


class InProcessExecutor:
    """Train one unit at a time in this process, with this process's torch threads."""

    backend = "in-process"
    capacity = 1

    def __init__(self) -> None:
        self._queue: deque = deque()

    def submit(self, unit: _Unit, data) -> None:
        self._queue.append((unit, data))

    def wait(self) -> list[tuple[_Unit, tuple]]:
        unit, data = self._queue.popleft()
        return [(unit, train_unit(unit.trainer, unit.configs, data, unit.grouped))]

    def abort(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        self.close()


# state of a pool worker process, set once by _init_pool_worker
_WORKER: dict = {}


def _init_pool_worker(data, threads, slots, next_slot) -> None:
    # the parent handles Ctrl-C and stops the workers, so a worker ignores SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(os.getppid())
    if threads is not None:
        torch.set_num_threads(threads)
    with next_slot.get_lock():
        slot = next_slot.value
        next_slot.value += 1
    _WORKER.update(data=data, slots=slots, slot=slot if 2 * slot < len(slots) else None)


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Start a daemon thread that ends this worker once ``parent`` has died.

    A parent killed by SIGKILL cannot stop its pool, and the workers would otherwise sleep
    on, holding their memory. An orphan's parent process id changes (to 1 or a subreaper).
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="normlab-parent-watch", daemon=True).start()


def _pool_task(unit_id: int, trainer: Callable, configs: list, grouped: bool) -> tuple:
    # slots contains (pid, unit id) per worker, so the parent can tell which unit a dead
    # worker was training
    slots, slot = _WORKER["slots"], _WORKER["slot"]
    if slot is not None:
        slots[2 * slot] = os.getpid()
        slots[2 * slot + 1] = unit_id
    try:
        return train_unit(trainer, configs, _WORKER["data"], grouped)
    finally:
        if slot is not None:
            slots[2 * slot + 1] = -1


def _default_start_method() -> str:
    # NOTE: fork starts workers fast, and they inherit the data set without pickling and
    # the trainers registered at run time. CUDA cannot be used again in a forked child once
    # this process initialized it, and fork is unsafe on macOS, so those cases use spawn.
    if sys.platform == "linux" and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


class PoolExecutor:
    """Train units in ``workers`` local worker processes, each with ``threads`` torch threads.

    The data set reaches each worker once, through the pool initializer. When a worker
    dies, ``concurrent.futures`` breaks the whole pool, so the executor starts a new pool:
    the unit whose worker died gets a ``died`` outcome and the other units in flight are
    resubmitted.
    """

    backend = "process"

    def __init__(self, workers: int, threads: Optional[int] = None,
                 start_method: Optional[str] = None) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.capacity = workers
        self._threads = threads
        self._start_method = start_method
        self._pool: Optional[_ProcessPool] = None
        self._data = None
        self._futures: dict = {}  # future -> (unit id, unit)
        self._processes: dict = {}  # pid -> multiprocessing.Process of the current pool
        self._next_unit_id = 0

    def _open_pool(self, data) -> None:
        context = multiprocessing.get_context(self._start_method or _default_start_method())
        self._slots = context.RawArray("q", [-1] * (2 * self.capacity))
        self._pool = _ProcessPool(
            self.capacity,
            mp_context=context,
            initializer=_init_pool_worker,
            initargs=(data, self._threads, self._slots, context.Value("i", 0)),
        )
        self._data = data
        self._processes = {}

    def submit(self, unit: _Unit, data) -> None:
        if self._pool is not None and self._data is not data:
            self._shutdown_pool()
        if self._pool is None:
            self._open_pool(data)
        self._next_unit_id += 1
        try:
            future = self._pool.submit(
                _pool_task, self._next_unit_id, unit.trainer, unit.configs, unit.grouped
            )
        except BrokenExecutor as error:
            # the pool broke since the last wait(); wait() restarts it
            future = _failed_future(error)
        # NOTE: _processes is private to ProcessPoolExecutor (read on CPython 3.11), and it
        # gives the exit code of a dead worker. Without it every unit in flight counts an
        # attempt when the pool breaks.
        self._processes.update(getattr(self._pool, "_processes", None) or {})
        self._futures[future] = (self._next_unit_id, unit)

    def wait(self) -> list[tuple[_Unit, tuple]]:
        done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
        outcomes = []
        broken = False
        for future in done:
            if isinstance(future.exception(), BrokenExecutor):
                broken = True
                continue
            _, unit = self._futures.pop(future)
            outcomes.append((unit, future.result()))
        if broken:
            outcomes.extend(self._recover())
        return outcomes

    def _recover(self) -> list[tuple[_Unit, tuple]]:
        """Close the broken pool and return an outcome for every unit that was in flight."""
        processes = dict(self._processes)
        self._pool.shutdown(wait=True)  # joins the workers, so their exit codes are known
        self._pool = None

        # find the units whose worker died
        exit_codes = {pid: process.exitcode for pid, process in processes.items()}
        running = {
            int(self._slots[2 * i + 1]): int(self._slots[2 * i])
            for i in range(self.capacity)
            if self._slots[2 * i + 1] >= 0
        }
        # the pool terminates the surviving workers with SIGTERM after one dies
        dead = {unit_id: exit_codes[pid] for unit_id, pid in running.items()
                if exit_codes.get(pid) not in (None, 0, -signal.SIGTERM)}

        outcomes = []
        for future, (unit_id, unit) in list(self._futures.items()):
            if not isinstance(future.exception(), BrokenExecutor):
                outcomes.append((unit, future.result()))
            elif unit_id in dead:
                message = (f"worker process {running[unit_id]} died "
                           f"({_describe_exit(dead[unit_id])}) while training this run")
                outcomes.append((unit, ("died", message, 0)))
            elif dead:
                outcomes.append((unit, ("resubmit",)))
            else:
                codes = ", ".join(_describe_exit(code) for code in exit_codes.values())
                message = ("a worker process died and the pool cannot tell which run it "
                           f"was training (workers: {codes})")
                outcomes.append((unit, ("died", message, 0)))

        resubmitted = sum(outcome[0] != "ok" for _, outcome in outcomes)
        logger.warning("a worker process died (%s); the %d units in flight go to a new pool",
                       ", ".join(_describe_exit(code) for code in dead.values()) or
                       "while training an unknown unit", resubmitted)
        self._futures.clear()
        return outcomes

    def _shutdown_pool(self, abort: bool = False) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=not abort, cancel_futures=True)
        if abort:
            for process in self._processes.values():
                if process.is_alive():
                    process.terminate()
        self._pool = None
        self._futures.clear()

    def abort(self) -> None:
        """Stop the workers and drop the units in flight; a later submit starts a new pool."""
        self._shutdown_pool(abort=True)

    def close(self) -> None:
        self._shutdown_pool()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        self.close()


def _failed_future(error: BaseException) -> Future:
    future = Future()
    future.set_exception(error)
    return future


def _describe_exit(exit_code: Optional[int]) -> str:
    if exit_code is None:
        return "exit code unknown"
    if exit_code < 0:
        try:
            return f"killed by signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


# Ray runs a task again this many times when its worker process dies
RAY_MAX_RETRIES = 1


def _ray_task(trainer: Callable, configs: list, data, grouped: bool,
              threads: Optional[int]) -> tuple:
    if threads is not None:
        torch.set_num_threads(threads)
    return train_unit(trainer, configs, data, grouped)


def ray_available() -> bool:
    """Return whether the optional ``ray`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(f"the ray backend needs the ray package, which is not installed; "
                          f"{RAY_INSTALL_HINT}") from error
    return ray


def _check_ray_address(address: str, timeout: float = 10.0) -> None:
    """Raise ValueError when nothing listens at a ``HOST:PORT`` Ray address.

    ``ray.init`` retries an unreachable address for minutes with only Ray's own warnings,
    so a mistyped address is caught here first. ``auto`` and addresses without a port are
    left to Ray.
    """
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(
            f"cannot reach a Ray cluster at --address {address}: {error}. Start one with "
            "`ray start --head` on that host, or drop --address to start a local Ray "
            "instance"
        ) from None


class RayExecutor:
    """Train units as Ray tasks, each with ``threads`` CPUs and torch threads.

    With ``address`` it connects to that Ray cluster, and without it starts a local Ray
    instance with ``workers`` CPUs, unless this process is connected to Ray already. The
    data set goes into Ray's object store once. Ray runs a task again on a new worker when
    its worker dies (``max_retries``). An exception is returned as a traceback and retried
    by the sweep.
    """

    backend = "ray"

    def __init__(self, workers: int = 1, threads: Optional[int] = None,
                 address: Optional[str] = None) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        ray = self._ray = _import_ray()
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray:
            logger.info("using the Ray instance this process is connected to")
        elif address:
            _check_ray_address(address)
            ray.init(address=address)
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
        self._threads = threads
        cpus_per_task = threads or 1
        cpus = ray.cluster_resources().get("CPU", workers)
        self.capacity = max(1, int(cpus // cpus_per_task))
        self._remote = ray.remote(num_cpus=cpus_per_task, max_retries=RAY_MAX_RETRIES)(
            _ray_task
        )
        self._refs: dict = {}  # ObjectRef of a task -> unit
        self._data = None
        self._data_ref = None

    def submit(self, unit: _Unit, data) -> None:
        if self._data_ref is None or self._data is not data:
            self._data, self._data_ref = data, self._ray.put(data)
        ref = self._remote.remote(
            unit.trainer, unit.configs, self._data_ref, unit.grouped, self._threads
        )
        self._refs[ref] = unit

    def wait(self) -> list[tuple[_Unit, tuple]]:
        from ray.exceptions import RayError, RayTaskError

        ready, _ = self._ray.wait(list(self._refs), num_returns=1)
        outcomes = []
        for ref in ready:
            unit = self._refs.pop(ref)
            try:
                outcomes.append((unit, self._ray.get(ref)))
            except RayTaskError:
                raise  # an exception outside RUN_ERRORS stops the sweep, as in-process
            except RayError as error:
                # NOTE: Ray does not report the retries of a task that then succeeds, so a
                # run that finished after a worker death counts one attempt in the store
                message = (f"the Ray worker process died {RAY_MAX_RETRIES + 1} times "
                           f"while training this run: {error}")
                outcomes.append((unit, ("died", message, RAY_MAX_RETRIES)))
        return outcomes

    def abort(self) -> None:
        """Cancel the tasks in flight; the executor stays usable."""
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()

    def close(self) -> None:
        self._refs.clear()
        self._data = self._data_ref = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        self.close()


def open_executor(backend: str = "in-process", workers: int = 1,
                  threads: Optional[int] = None, address: Optional[str] = None):
    """Return the executor of ``backend``, one of ``BACKENDS``; close it after the sweeps.

    Args:
        backend: ``"in-process"``, ``"process"`` or ``"ray"``.
        workers: worker processes of the pool, or CPUs of a local Ray instance.
        threads: torch threads per worker (None keeps torch's default).
        address: address of a running Ray cluster (ray only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if address is not None and backend != "ray":
        raise ValueError(f"an address applies to the ray backend only, got backend "
                         f"{backend!r}; pass backend='ray' or drop the address")
    if backend == "in-process":
        if workers != 1:
            raise ValueError(f"the in-process backend trains one run at a time, got "
                             f"workers={workers!r}; use the process or ray backend")
        return InProcessExecutor()
    if backend == "process":
        return PoolExecutor(workers, threads)
    return RayExecutor(workers, threads, address)


# -- the sweep -----------------------------------------------------------------------------


def run_sweep(
    configs: Sequence[TrainConfig],
    store: RunStore,
    data,
    progress: bool = True,
    desc: str = "runs",
    executor=None,
) -> dict[str, RunRecord]:
    """Train the configs that are not finished or diverged in ``store`` and return all runs.

    ``executor`` (from :func:`open_executor`) picks the backend, and None trains in this
    process. This process writes every run to ``store`` as soon as its result comes back.
    A run that raises one of ``RUN_ERRORS``, or whose worker process dies, is trained again
    once. If that fails too, the run is recorded as ``failed`` with its traceback or the
    cause of death, and the sweep goes on. The next sweep trains it again. The store's
    ``attempts`` column counts every start of a run, a failed group attempt included.
    ``KeyboardInterrupt`` leaves the runs in flight ``running``, so they are trained again
    too, and every run stored before is kept.
    """
    configs = unique(configs)
    pending = [c for c in configs if store.status(c.key()) not in ("finished", "diverged")]
    done = len(configs) - len(pending)
    if done:
        logger.info("%s: %d of %d runs already in the store", desc, done, len(configs))
    units = plan_units(pending)
    bar = tqdm(total=len(pending), desc=desc, unit="run",
               disable=not progress or not pending, dynamic_ncols=True)
    own_executor = executor is None
    executor = InProcessExecutor() if own_executor else executor
    try:
        with logging_redirect_tqdm():
            _train_units(units, executor, store, data, bar)
    except BaseException:
        executor.abort()  # runs in flight stay ``running`` in the store
        raise
    finally:
        bar.close()
    if own_executor:
        executor.close()
    return store.load_many(c.key() for c in configs)


def _train_units(units: list[_Unit], executor, store: RunStore, data, bar) -> None:
    queue = deque(units)
    in_flight = 0
    while queue or in_flight:
        while queue and in_flight < executor.capacity:
            unit = queue.popleft()
            _start(unit, store)
            executor.submit(unit, data)
            in_flight += 1
            bar.set_postfix_str(unit.describe())
        for unit, outcome in executor.wait():
            in_flight -= 1
            _handle_outcome(unit, outcome, store, queue, bar)


def _start(unit: _Unit, store: RunStore) -> None:
    if unit.count_attempt:
        unit.run_ids = [store.start(config) for config in unit.configs]
        if not unit.grouped:
            unit.attempts += 1
    unit.count_attempt = True


def _handle_outcome(unit: _Unit, outcome: tuple, store: RunStore, queue: deque, bar) -> None:
    kind = outcome[0]
    if kind == "ok":
        for run_id, result in zip(unit.run_ids, outcome[1]):
            store.finish(run_id, result)
        bar.update(len(unit.configs))
        return
    if kind == "resubmit":
        unit.count_attempt = False
        queue.appendleft(unit)
        return
    error = outcome[1]
    if unit.grouped:
        queue.extendleft(reversed(_fall_back(unit, error)))
        return
    retries = outcome[2] if kind == "died" else 0
    attempts = unit.attempts + retries
    key = unit.configs[0].key()
    if attempts < MAX_ATTEMPTS:
        logger.warning("run %s (%s) failed on attempt %d of %d, retrying: %s", key,
                       unit.describe(), attempts, MAX_ATTEMPTS, _last_line(error))
        queue.appendleft(unit)
        return
    logger.error("run %s (%s) failed after %d attempts: %s", key, unit.describe(), attempts,
                 _last_line(error))
    store.fail(unit.run_ids[0], error, extra_attempts=retries)
    bar.update(1)


def _fall_back(unit: _Unit, error: str) -> list[_Unit]:
    """Split a failed group into smaller units; each then gets its own attempts.

    A group of several configs becomes groups of one for the same group trainer, so a run
    whose group lost its worker still gets the numbers of the group trainer. A group of
    one that fails is trained by the single-run trainer.
    """
    if len(unit.configs) > 1:
        logger.warning("the group trainer failed on a %s; training its runs as groups of "
                       "one: %s", unit.describe(), _last_line(error))
        return [
            _Unit([config], unit.trainer, grouped=True, run_ids=[run_id])
            for config, run_id in zip(unit.configs, unit.run_ids)
        ]
    logger.warning("the group trainer failed on run %s; training it with the single-run "
                   "trainer: %s", unit.configs[0].key(), _last_line(error))
    return [_Unit(list(unit.configs), _single_trainer(unit.configs[0]), grouped=False,
                  run_ids=list(unit.run_ids))]


def _last_line(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else error
