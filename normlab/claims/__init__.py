"""One module per claim about BatchNorm, each with a fixed decision rule."""

from __future__ import annotations

from .base import Claim, StudyContext, Verdict
from .batch_size import BatchSize
from .dncnn_bn import DnCNNBatchNorm
from .dropout import Dropout
from .edsr_no_bn import EDSRWithoutBatchNorm
from .faster_convergence import FasterConvergence
from .gan_weightnorm import GANWeightNorm
from .gradient_stability import GradientStability
from .higher_lr import HigherLearningRate
from .ics import InternalCovariateShift
from .init_insensitivity import InitInsensitivity
from .layer_order import LayerOrder
from .momentum_eps import MomentumEps
from .regularization import Regularization
from .smoothness import Smoothness
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from .weightnorm_generalization import WeightNormGeneralization

CLAIMS: dict[str, type[Claim]] = {
    cls.id: cls
    for cls in (
        HigherLearningRate,
        FasterConvergence,
        DnCNNBatchNorm,
        EDSRWithoutBatchNorm,
        InitInsensitivity,
        Regularization,
        LayerOrder,
        MomentumEps,
        GANWeightNorm,
        InternalCovariateShift,
        Smoothness,
        GradientStability,
        BatchSize,
        Dropout,
        WeightNormGeneralization,
    )
}


def get_claim(claim_id: str) -> Claim:
    """Return the claim registered as ``claim_id``, or raise ``ValueError`` listing the ids."""
    key = claim_id.strip().lower()
    if key not in CLAIMS:
        raise ValueError(
            f"unknown claim {claim_id!r}; valid ids are: {', '.join(CLAIMS)} "
            "(run `normlab claims` to list them)"
        )
    return CLAIMS[key]()


__all__ = [
    "CLAIMS",
    "Claim",
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "StudyContext",
    "Verdict",
    "get_claim",
]
