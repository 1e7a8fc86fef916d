"""Datasets for the experiments: image classification with fixed splits."""

from normlab.data.classification import (
    DATASETS,
    ClassificationData,
    DataError,
    Split,
    load_classification,
)

__all__ = [
    "DATASETS",
    "ClassificationData",
    "DataError",
    "Split",
    "load_classification",
]
