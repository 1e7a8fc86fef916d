"""Train every config of a sweep that the run store does not hold yet."""

from __future__ import annotations

import logging
import traceback
from typing import Callable, Sequence

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .store import RunRecord, RunStore
from .train.config import TrainConfig
from .train.loop import train_classifier

logger = logging.getLogger(__name__)


def unique(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """Return ``configs`` without repeated keys, in their first order."""
    seen: dict[str, TrainConfig] = {}
    for config in configs:
        seen.setdefault(config.key(), config)
    return list(seen.values())


def run_sweep(
    configs: Sequence[TrainConfig],
    store: RunStore,
    data,
    progress: bool = True,
    desc: str = "runs",
) -> dict[str, RunRecord]:
    """Train the configs that are not finished or diverged in ``store`` and return all runs.

    A run that raises is recorded as ``failed`` with its traceback and the sweep goes on; the
    next sweep trains it again. ``KeyboardInterrupt`` leaves the current run ``running``, so
    it is trained again too, and every run stored before it is kept.
    """
    configs = unique(configs)
    pending = [c for c in configs if store.status(c.key()) not in ("finished", "diverged")]
    done = len(configs) - len(pending)
    if done:
        logger.info("%s: %d of %d runs already in the store", desc, done, len(configs))
    bar = tqdm(pending, desc=desc, unit="run", disable=not progress or not pending,
               dynamic_ncols=True)
    with logging_redirect_tqdm():
        for config in bar:
            bar.set_postfix_str(f"{config.norm} lr={config.lr:.3g} seed={config.seed}")
            _run_one(config, store, data)
    bar.close()
    return store.load_many(c.key() for c in configs)


def _classify(config: TrainConfig, data):
    # looked up at call time, so tests can replace train_classifier in this module
    return train_classifier(config, data)


TRAINERS: dict[str, Callable] = {TrainConfig.task: _classify}


def register_trainer(task: str, trainer: Callable) -> None:
    """Train configs whose ``task`` is ``task`` with ``trainer(config, data)``."""
    TRAINERS[task] = trainer


def _run_one(config, store: RunStore, data) -> None:
    run_id = store.start(config)
    try:
        result = TRAINERS[config.task](config, data)
    except (ValueError, RuntimeError, FloatingPointError) as error:
        logger.error("run %s failed: %s", config.key(), error)
        store.fail(run_id, "".join(traceback.format_exception(error)))
        return
    store.finish(run_id, result)
