"""Probes that measure a model during training: the memory a step costs, the internal
covariate shift of its layers, the loss landscape along the gradient and the
percentiles of its activations."""

from normlab.probes.activations import (
    ActivationRecorder,
    grad_norms,
    percentiles,
    suspend_recording,
)
from normlab.probes.ics import ics_step
from normlab.probes.landscape import default_step_sizes, landscape_step
from normlab.probes.memory import (
    PeakMemory,
    SavedTensorReport,
    peak_memory,
    saved_tensor_bytes,
)

__all__ = [
    "PeakMemory",
    "SavedTensorReport",
    "peak_memory",
    "saved_tensor_bytes",
    "ActivationRecorder",
    "default_step_sizes",
    "grad_norms",
    "ics_step",
    "landscape_step",
    "percentiles",
    "suspend_recording",
]
