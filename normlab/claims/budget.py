"""Training budgets per data set and scale, shared by the classification claims.

``quick`` fits a whole ``normlab verify`` on two CPU cores in minutes; ``full`` trains
longer. Every claim that trains the same config shares the stored run.
"""

from __future__ import annotations

from ..train.config import TrainConfig

# epochs over the training split, and steps between two validation evaluations
BUDGETS = {
    ("digits", "quick"): {"epochs": 15, "eval_every": 2},
    ("digits", "full"): {"epochs": 40, "eval_every": 2},
    ("mnist", "quick"): {"epochs": 2, "eval_every": 50},
    ("mnist", "full"): {"epochs": 10, "eval_every": 100},
    ("cifar10", "quick"): {"epochs": 15, "eval_every": 10},
    ("cifar10", "full"): {"epochs": 40, "eval_every": 10},
}

# conditions compared by the BN claims: normlab's BatchNorm against no normalization
BN, NO_NORM = "batchnorm", "none"
CONDITION_LABELS = {BN: "BatchNorm", NO_NORM: "no normalization"}
CONDITION_COLORS = {BN: "tab:blue", NO_NORM: "tab:orange"}


def base_config(dataset: str, scale: str, device: str = "cpu", **changes) -> TrainConfig:
    """Return the MLP config of the classification claims for ``dataset`` at ``scale``.

    SGD with momentum 0.9, batch size 64, two hidden layers of 100 units with ReLU: the
    tutorial setting of the BatchNorm paper's MNIST experiment, with ReLU for sigmoid.
    """
    try:
        budget = BUDGETS[(dataset, scale)]
    except KeyError:
        raise ValueError(
            f"no training budget for dataset {dataset!r} at scale {scale!r}; "
            f"known: {sorted(BUDGETS)}"
        ) from None
    settings = dict(
        dataset=dataset,
        model="mlp",
        hidden=(100, 100),
        optimizer="sgd",
        momentum=0.9,
        batch_size=64,
        device=device,
        **budget,
    )
    settings.update(changes)
    return TrainConfig(**settings)
