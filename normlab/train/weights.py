"""Trained weights kept for the plots that need a run's network after its sweep."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


class KeptWeights(collections.OrderedDict):
    """The state_dicts of the last ``capacity`` trained networks, by run key, on the CPU.

    A sweep that trains in this process keeps each network here, so a claim can draw its
    output without training it again. The oldest entry goes first when full.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def keep(self, key: str, module: nn.Module) -> None:
        self[key] = {
            name: value.detach().cpu().clone() for name, value in module.state_dict().items()
        }
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


def trained_state(
    key: str,
    kept: KeptWeights,
    checkpoint_dir: Optional[Path],
    retrain: Callable[[], bool],
) -> Optional[dict]:
    """Return the state_dict of run ``key``, or None when the run diverges.

    The weights come from ``kept`` when the run trained in this process, else from
    ``checkpoint_dir/<key>.pt``, else from ``retrain()``, which trains the run again (so
    that it lands in ``kept``) and returns whether it finished. A run is deterministic for
    its seed on one machine, so retraining gives the same weights there. The weights are
    saved into ``checkpoint_dir`` when it is given.
    """
    path = Path(checkpoint_dir) / f"{key}.pt" if checkpoint_dir is not None else None
    state = kept.get(key)
    if state is None and path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    if state is None:
        logger.info("training run %s again to show its output", key)
        if not retrain():
            return None
        state = kept[key]
    if path is not None and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return state
