"""Image classification datasets as normalised, fixed train/val/test tensors.

``load_classification`` is the entry point. Each dataset module (``digits``, ``mnist``,
``cifar10``) reads its files into uint8 arrays of shape (N, C, H, W), and this module
splits off validation images, computes per-channel statistics on the train split and
normalises every split with them.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "cifar10")

# Seed of every train/val split. It is fixed so that the split never depends on the run
# seed: runs with different seeds train and select models on the same images.
SPLIT_SEED = 0


class DataError(ValueError):
    """A dataset that cannot be loaded: unknown name, missing or corrupt files."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset, usable as a map-style ``torch.utils.data.Dataset``.

    Attributes:
        x: normalised images, float32 of shape (N, C, H, W).
        y: class labels, int64 of shape (N,).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(
                f"x must have shape (N, C, H, W), got {tuple(self.x.shape)}"
            )
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"y must have shape ({self.x.shape[0]},) to match x, "
                f"got {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


@dataclass(frozen=True, eq=False)
class ClassificationData:
    """An image classification dataset split into train, val and test.

    Attributes:
        name: dataset name, one of ``DATASETS``.
        train, val, test: the splits, normalised with the train split's statistics.
        num_classes: number of classes, with labels 0 .. num_classes - 1.
        in_channels: image channels (1 or 3).
        image_size: image height, equal to the width.
        mean, std: per-channel mean and population standard deviation of the train
            split, on the [0, 1] pixel scale, that every split was normalised with.
        source: where the images came from, and whether they are a subset.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def in_features(self) -> int:
        """Number of values in one image, C * H * W."""
        return self.in_channels * self.image_size * self.image_size


def load_classification(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ClassificationData:
    """Load a classification dataset with its fixed train/val/test split.

    Args:
        name: one of ``DATASETS`` (case-insensitive).
        data_dir: folder with the dataset files. ``digits`` ignores it because
            scikit-learn bundles that dataset. ``mnist`` and ``cifar10`` require it
            unless ``download`` is true, in which case None means the user cache
            folder (``$XDG_CACHE_HOME/normlab``, by default ``~/.cache/normlab``).
        download: download the standard files that are missing. Nothing is downloaded
            when this is false.

    Raises:
        DataError: for an unknown name, a missing folder or file, a checksum mismatch
            or a corrupt file. The message names the folder, the expected files and
            what to do.
    """
    # Deferred import because the dataset modules import DataError from this module.
    from normlab.data import cifar10, digits, mnist

    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        )
    if key == "digits":
        return digits.load_digits_data()

    folder = resolve_data_dir(key, data_dir, download)
    if key == "mnist":
        return mnist.load_mnist(folder, download=download)
    return cifar10.load_cifar10(folder, download=download)


def default_data_dir() -> Path:
    """Return the folder that ``download=True`` uses when no data folder is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "normlab"


def resolve_data_dir(
    name: str, data_dir: str | os.PathLike | None, download: bool
) -> Path:
    """Return the data folder for ``name``, creating it only when downloading."""
    if data_dir is None:
        if not download:
            raise DataError(
                f"{name} needs a data folder: pass --data-dir DIR (data_dir=DIR) with "
                f"the {name} files, or use --download (download=True) to download them into "
                f"{default_data_dir()}"
            )
        data_dir = default_data_dir()

    folder = Path(data_dir).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DataError(
            f"data folder {folder} is not a folder; pass a folder with --data-dir DIR"
        )
    if not download:
        raise DataError(
            f"data folder {folder} not found; pass an existing folder with the {name} "
            f"files with --data-dir DIR, or use --download (download=True) to create it and "
            f"download {name}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def validate_arrays(
    x: np.ndarray,
    y: np.ndarray,
    image_shape: tuple[int, ...],
    num_classes: int,
    origin: str,
) -> None:
    """Raise DataError unless x is uint8 images of ``image_shape`` with valid labels.

    ``origin`` names the file the arrays came from, for the message.
    """
    fix = "replace the file with an intact copy"
    if x.dtype != np.uint8:
        raise DataError(
            f"images in {origin} have dtype {x.dtype}{_non_finite(x)}, expected uint8 "
            f"pixels from 0 to 255; {fix}, or save x as uint8 pixels"
        )
    if x.ndim != len(image_shape) + 1 or x.shape[1:] != image_shape:
        raise DataError(
            f"images in {origin} have shape {x.shape}, expected (N, "
            f"{', '.join(str(size) for size in image_shape)}); {fix}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"labels in {origin} have shape {y.shape} and dtype {y.dtype}"
            f"{_non_finite(y)}, expected a 1-d integer array; {fix}"
        )
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"{origin} has {x.shape[0]} images but {y.shape[0]} labels; {fix}"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"labels in {origin} range from {y.min()} to {y.max()}, expected 0 to "
            f"{num_classes - 1}; {fix}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{origin} contains no images; {fix}")


def _non_finite(array: np.ndarray) -> str:
    """Return ", with N NaN and M Inf values" for a float array that has any, else ""."""
    if not np.issubdtype(array.dtype, np.floating):
        return ""
    num_nan = int(np.isnan(array).sum())
    num_inf = int(np.isinf(array).sum())
    if num_nan == 0 and num_inf == 0:
        return ""
    return f", with {num_nan} NaN and {num_inf} Inf values"


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``x`` and ``y`` arrays of an npz file, rejecting pickled objects."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            files = arrays.files
            if "x" in files and "y" in files:
                return arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(
            f"cannot read {path}: {error}; the file is truncated or corrupt, so "
            f"replace it with an intact copy"
        ) from error
    raise DataError(
        f"{path} contains the arrays {files}, expected 'x' (images) and 'y' (labels); "
        f"replace the file with an intact copy"
    )


def split_off_validation(num_train: int, num_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, val) indices that hold out ``num_val`` of ``num_train``.

    The permutation comes from the legacy ``np.random.RandomState``, whose stream NumPy
    keeps stable across versions, seeded with ``SPLIT_SEED``.
    """
    if not 0 < num_val < num_train:
        raise DataError(
            f"cannot hold out {num_val} validation images from {num_train} training "
            f"images; the training files need at least 2 images"
        )
    permutation = np.random.RandomState(SPLIT_SEED).permutation(num_train)
    return np.sort(permutation[num_val:]), np.sort(permutation[:num_val])


def channel_statistics(
    x: np.ndarray, max_value: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and population std of uint8 images x (N, C, H, W).

    The values are on the [0, 1] scale, pixel / ``max_value``. They are computed exactly
    in float64 from a histogram of the 256 possible pixel values.
    """
    levels = np.arange(256, dtype=np.float64) / max_value
    means, stds = [], []
    for channel in range(x.shape[1]):
        # torch.bincount counts uint8 values directly. np.bincount first casts them to
        # int64, which made it about 15x slower on MNIST (NumPy 2.4, torch 2.13, CPU).
        values = torch.from_numpy(np.ascontiguousarray(x[:, channel])).flatten()
        counts = torch.bincount(values, minlength=256).numpy().astype(np.float64)
        total = counts.sum()
        mean = float(counts @ levels / total)
        variance = float(counts @ (levels - mean) ** 2 / total)
        means.append(mean)
        stds.append(variance**0.5)
    return tuple(means), tuple(stds)


def normalise(
    x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], max_value: int
) -> torch.Tensor:
    """Return float32 (x / max_value - mean) / std per channel, x uint8 (N, C, H, W)."""
    std_array = np.asarray(std, dtype=np.float64)
    scale = torch.from_numpy(1.0 / (max_value * std_array)).float().view(1, -1, 1, 1)
    shift = torch.from_numpy(np.asarray(mean) / std_array).float().view(1, -1, 1, 1)
    images = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return images.mul_(scale).sub_(shift)


def build_classification_data(
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    max_value: int,
    source: str,
) -> ClassificationData:
    """Normalise uint8 splits with the train statistics into ClassificationData.

    ``splits`` maps "train", "val" and "test" to (images (N, C, H, W), labels).
    """
    train_x = splits["train"][0]
    mean, std = channel_statistics(train_x, max_value)
    for channel, value in enumerate(std):
        if value == 0.0:
            raise DataError(
                f"channel {channel} of the {name} training images is constant, so it "
                f"cannot be normalised; check the files in {source}"
            )

    tensors = {}
    for split_name, (x, y) in splits.items():
        labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
        tensors[split_name] = Split(normalise(x, mean, std, max_value), labels)

    data = ClassificationData(
        name=name,
        train=tensors["train"],
        val=tensors["val"],
        test=tensors["test"],
        num_classes=num_classes,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[2],
        mean=mean,
        std=std,
        source=source,
    )
    logger.info(
        "loaded %s: %d train, %d val, %d test images from %s",
        name,
        len(data.train),
        len(data.val),
        len(data.test),
        source,
    )
    return data


def split_and_build(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_val: int,
    num_classes: int,
    source: str,
) -> ClassificationData:
    """Hold out ``num_val`` training images for validation and build the dataset."""
    train_x, train_y = train
    train_index, val_index = split_off_validation(train_x.shape[0], num_val)
    splits = {
        "train": (train_x[train_index], train_y[train_index]),
        "val": (train_x[val_index], train_y[val_index]),
        "test": test,
    }
    return build_classification_data(name, splits, num_classes, 255, source)
