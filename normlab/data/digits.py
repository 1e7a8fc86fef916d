"""scikit-learn's bundled 8x8 handwritten digits, which need no download."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from normlab.data.classification import (
    SPLIT_SEED,
    ClassificationData,
    build_classification_data,
)

NUM_CLASSES = 10
# Pixels are integers from 0 to 16: counts of set pixels in 4x4 blocks of the
# original 32x32 bitmaps.
MAX_PIXEL = 16
TEST_FRACTION = 0.2
# Fraction of the remaining 80% held out for validation: 0.25 * 0.8 = 20% of all images.
VAL_FRACTION_OF_REST = 0.25


def load_digits_data() -> ClassificationData:
    """Load the 1,797 digits with a stratified 60/20/20 train/val/test split.

    The split uses ``SPLIT_SEED``, so it is the same on every call. scikit-learn rounds
    the test and val sizes up, which gives 1077 train, 360 val and 360 test images.
    """
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    indices = np.arange(labels.shape[0])

    rest, test = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION_OF_REST,
        stratify=labels[rest],
        random_state=SPLIT_SEED,
    )
    splits = {
        name: (images[np.sort(index)], labels[np.sort(index)])
        for name, index in (("train", train), ("val", val), ("test", test))
    }
    return build_classification_data(
        "digits",
        splits,
        num_classes=NUM_CLASSES,
        max_value=MAX_PIXEL,
        source="scikit-learn bundled digits (sklearn.datasets.load_digits)",
    )
