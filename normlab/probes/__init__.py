"""Probes that measure what a model costs to train, such as its activation memory."""

from normlab.probes.memory import (
    PeakMemory,
    SavedTensorReport,
    peak_memory,
    saved_tensor_bytes,
)

__all__ = ["PeakMemory", "SavedTensorReport", "peak_memory", "saved_tensor_bytes"]
